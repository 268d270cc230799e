"""Registration: validates sign-ups and queues them on Kinesis; stateless, scales out freely."""
