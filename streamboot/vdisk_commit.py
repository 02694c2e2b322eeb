"""A finished maintenance session's writes -> the next vdisk version.

A maintenance session boots the latest version read-write with a kept server-disk write
cache, which the cache service holds under ``device-<mac>-<vdisk>-v<version>`` (see
``services/cache/write_cache.py``). Committing it (``streamboot vdisk commit NAME``):

1. ask the registry which session and cache (``GET /vdisks/NAME/commit-source``);
2. materialise that version's chain as a sparse raw image in a staging dir;
3. overlay the cache service's dirty blocks (``streamboot.cache.wc.open`` for the block map,
   routed to the cache node holding the cache; that node's ``wc.read`` for the data) and
   zero its zeroed blocks;
4. find its kernel and initramfs (``vdisk_store.scan_boot_files``), store the delta over the chain (``vdisk_store.delta_version``) and register it
   (``POST /vdisks/NAME/versions`` with ``from_maintenance_session``): the registry checks,
   under its append lock, that this session is still the last one and nothing moved on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from shared import vdisk_store
from shared.block_map import BLOCK, DIRTY
from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient
from shared.vdisk_store import Progress, StagedVersion

PULL_DEPTH = 8


async def overlay_write_cache(
    nc: NATS, source: dict[str, Any], image: Path, progress: Progress
) -> int:
    """Apply the kept write cache of ``source`` onto ``image``; returns bytes applied."""
    client = CacheClient(nc)
    size = int(source["size"])
    key = source["write_cache_key"]
    # Routed to the cache node holding the kept cache (create: false: a key no node holds
    # is an error, not a new empty cache); its blocks are read from that node.
    opened = await client.open_write_cache(
        {
            "key": key,
            "session_id": source["session_id"],
            "vdisk": source["vdisk"],
            "version": source["version"],
            "size": size,
            "kind": source.get("write_cache") or "server-disk",
            "persistence": "keep",
            "mac": source["mac"],
            "create": False,
        },
    )
    pieces: list[tuple[int, int, bool]] = []
    for v, a, b in opened.runs:
        start, stop = a * BLOCK, min(b * BLOCK, size)
        pieces += [(o, n, v == DIRTY) for o, n in wire.chunks(start, stop - start)]
    total = sum(n for _, n, _ in pieces)
    done = 0
    sem = asyncio.Semaphore(PULL_DEPTH)
    fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
    try:

        async def apply(offset: int, length: int, dirty: bool) -> None:
            nonlocal done
            if dirty:
                async with sem:
                    data = await client.read_write_cache(opened.node, key, offset, length)
            else:
                data = bytes(length)
            os.pwrite(fd, data, offset)
            done += length
            progress("overlay", done, total)

        await asyncio.gather(*(apply(o, n, d) for o, n, d in pieces))
    finally:
        os.close(fd)
    return total


async def stage_commit(
    nc: NATS, root: Path, source: dict[str, Any], progress: Progress, kernel: str | None = None
) -> StagedVersion:
    name, version = source["vdisk"], int(source["next_version"])
    layers = [Path(p) for p in source["layers"]]
    staging = await asyncio.to_thread(vdisk_store.new_staging, root, name)
    try:
        work = staging / "work.raw"
        await asyncio.to_thread(vdisk_store.materialise, layers, work, progress)
        await overlay_write_cache(nc, source, work, progress)
        found = await asyncio.to_thread(
            vdisk_store.scan_boot_files, work, staging, kernel, progress
        )
        staged = await asyncio.to_thread(
            vdisk_store.delta_version,
            staging,
            name,
            work,
            version,
            layers,
            progress,
            temporary=True,
            unchanged=(
                f"maintenance session {source['session_id']} changed nothing in "
                f"{name!r} version {source['version']}: no new version"
            ),
        )
        return vdisk_store.with_boot_files(staged, found)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
