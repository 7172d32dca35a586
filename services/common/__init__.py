"""Shared runtime of every service: settings, logs, metrics, Kafka, object store, gRPC bootstrap."""
