"""What two or more course-signup services share: config, the server bootstrap and service runtime, Kinesis, leases."""
