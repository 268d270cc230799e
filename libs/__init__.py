"""What two or more course-signup services share: config, server bootstrap, Kinesis, leases."""
