"""A session's backend stack, assembled in one place from its policy (the ``ExportSpec``)
and the node's settings: which bottom serves the vdisk, and which layers wrap it (the
layers and the concurrency model: ``backend.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.stream.path.backend import Backend
from services.stream.path.cached_store import CachedStoreBackend, CacheLink
from services.stream.path.chain import ChainBackend
from services.stream.path.profile_hint import ProfileHint
from services.stream.path.remote_write_cache import RemoteWriteCache
from services.stream.path.ride_out import RideOut
from services.stream.path.spare_files import SpareFiles
from services.stream.path.write_cache import WriteCache
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec


@dataclass(frozen=True)
class Stack:
    top: Backend
    # The key of its write cache at the cache service; None when it has none there.
    remote_key: str | None = None


def build_stack(
    spec: ExportSpec,
    settings: StreamSettings,
    cache: CacheLink | None = None,
    spares: SpareFiles | None = None,
) -> Stack:
    """write cache -> version chain (no write cache on a read-only export).

    With a cache service (``cache``), server-side write caches live there (a local mirror
    keeps reads fast) and a vdisk of a non-local store is read through its shared read
    cache instead of a chain; a local vdisk's shared read cache is its files' page cache.
    ``spares``: disk files made ahead for the write cache (spare_files.py)."""
    bottom: Backend
    if cache is not None and spec.store != "local":
        bottom = CachedStoreBackend(spec, cache)
    else:
        bottom = ChainBackend(spec.layers)
        if cache is not None:
            bottom = ProfileHint(bottom, spec, cache)
    if bottom.size != spec.size:
        bottom.close()
        raise ValueError(
            f"chain of {spec.vdisk}@{spec.version} is {bottom.size} bytes, not {spec.size}"
        )
    if spec.export_read_only:
        return Stack(bottom)
    if settings.write_cache_dir is not None:
        settings.write_cache_dir.mkdir(parents=True, exist_ok=True)
    if cache is None:
        return Stack(WriteCache(bottom, spec.write_cache, settings.write_cache_dir, spares))
    top = remote_write_stack(
        bottom, spec, cache, settings.node_id, settings.write_cache_dir, spares
    )
    return Stack(top, top.remote.key)


def remote_write_stack(
    next_: Backend,
    spec: ExportSpec,
    link: CacheLink,
    node_id: str,
    directory: Path | None,
    spares: SpareFiles | None = None,
) -> RideOut:
    """A write cache held by the cache service over ``next_``: the outage ride-out over the
    shipping layer over its local mirror (RAM for a RAM cache, an unlinked file in
    ``directory`` for a disk cache; made by the first write or pull)."""
    mirror = WriteCache(next_, spec.write_cache, directory, spares)
    return RideOut(RemoteWriteCache(mirror, spec, link, node_id), link.outage_grace_s)


async def attach_stack(backend: Backend) -> None:
    """Attach a stack before it serves: every layer's ``attach``, concurrently."""
    await backend.attach()
