"""Shared library: settings, logging, metrics, Kafka, Redis and gRPC server wiring."""
