"""The cache tests' real processes (cache service, killable stream nodes) for failover."""

from tests.cache.conftest import base_image, system

__all__ = ["base_image", "system"]
