"""The boot tests reuse the registry's fixtures (the real registry service on real NATS and
PostgreSQL) for the script and hand-off endpoints."""

from tests.registry.conftest import data_dir, nc, registry  # noqa: F401
