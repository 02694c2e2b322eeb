"""A stream node's mirror of a non-local version lives while sessions use it, and a while
after (services/stream/path/cached_store.py: CacheLink.mirror / release_mirror)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.stream.path.cached_store import CachedStoreBackend, CacheLink
from services.stream.spec import ExportSpec
from shared.contracts.cache.client import CacheClient
from tests.stream.conftest import is_open

SIZE = 4 << 20
IDLE_S = 0.2


def backend(link: CacheLink, version: int = 1) -> CachedStoreBackend:
    spec = ExportSpec(
        f"s-{version}", "golden", version, (Path("golden/v1.raw"),), SIZE, store="nas"
    )
    return CachedStoreBackend(spec, link)


async def test_a_mirror_is_dropped_once_no_session_used_it_for_a_while(tmp_path: Path) -> None:
    # No request is made: the client is never used here.
    link = CacheLink(CacheClient(None), tmp_path, mirror_idle_s=IDLE_S)  # type: ignore[arg-type]
    first, second = backend(link), backend(link)
    assert first.mirror is second.mirror  # one mirror per version per node
    mirror = first.mirror
    mirror.fill(0, b"\x01" * 4096)
    first.close()
    first.close()  # twice: still one session out, not two
    await asyncio.sleep(2 * IDLE_S)
    assert link.mirrors["nas:golden@1"] is mirror and is_open(mirror.fd)  # second uses it

    second.close()
    third = backend(link)  # a new session before the idle time: the same mirror, blocks kept
    await asyncio.sleep(2 * IDLE_S)
    assert third.mirror is mirror and not mirror.missing(0, 4096)

    third.close()
    await asyncio.sleep(2 * IDLE_S)
    assert "nas:golden@1" not in link.mirrors
    assert mirror.closed and not is_open(mirror.fd)
    mirror.fill(4096, b"\x02" * 4096)  # a late fetch lands nowhere
    fresh = backend(link)
    assert fresh.mirror is not mirror and fresh.mirror.missing(0, 4096)
    fresh.close()


async def test_each_version_has_its_own_mirror_and_lifetime(tmp_path: Path) -> None:
    link = CacheLink(CacheClient(None), tmp_path, mirror_idle_s=IDLE_S)  # type: ignore[arg-type]
    old, new = backend(link, 1), backend(link, 2)
    assert old.mirror is not new.mirror
    old.close()
    await asyncio.sleep(2 * IDLE_S)
    assert set(link.mirrors) == {"nas:golden@2"}
    new.close()
