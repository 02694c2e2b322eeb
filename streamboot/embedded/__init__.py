"""Embedded servers for one-machine runs and tests: nats-server, PostgreSQL, and the
process plumbing that keeps their lifetimes tied to the supervisor."""
