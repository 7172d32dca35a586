"""The local stack: real servers (Kafka protocol, S3, Triton, Prometheus) and the services, started as processes on loopback."""
