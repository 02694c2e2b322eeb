"""The cache service process.

Issue 5 gives it its work: per-session write caches, the shared read cache, boot profiles
and prefetch. Until that lands it runs as a member of the system (connected, heartbeating,
shown by ``streamboot status``) and owns nothing yet; the stream service keeps session
writes in process behind the write-cache seam (services/stream/path/write_cache.py).
"""

from __future__ import annotations

from shared.service import ServiceRuntime, run_service


async def start(rt: ServiceRuntime) -> None:
    rt.vitals = {"write_caches": 0, "read_cache_bytes": 0}


def main() -> None:
    run_service("cache", start)
