"""Prefetch on BootRequested: the booting version's boot profile warmed into the read cache
(a remote store) or the page cache (a local one), as a span of the boot's trace, then
PrefetchCompleted. Part of the cache service (service.py wires it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace

from services.cache.boot_profiles import BootProfiles
from services.cache.read_cache import ReadCaches, VersionCache, warm_local
from services.cache.stores import Store, StoreError
from shared.events import BadEvent, BootRequested, Event, PrefetchCompleted, parse_message
from shared.telemetry import context_from_traceparent

tracer = trace.get_tracer("streamboot.cache")
log = logging.getLogger("streamboot.cache")


class Prefetcher:
    def __init__(
        self,
        reads: ReadCaches,
        profiles: BootProfiles,
        stores: dict[str, Store],
        emit: Callable[[Event], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.reads = reads
        self.profiles = profiles
        self.stores = stores
        self.emit = emit
        self._spawn = spawn
        self.prefetches = 0

    async def on_boot_requested(self, msg: Msg) -> None:
        try:
            env, event = parse_message(msg.data)
        except BadEvent as exc:
            log.warning("cache: skipped a message on %s: %s", msg.subject, exc)
            return
        if not isinstance(event, BootRequested):
            return
        info = self._version_for(event.vdisk, event.version)
        if info is not None:
            self._spawn(self.traced_prefetch(info, env.traceparent))

    async def traced_prefetch(self, info: dict[str, Any], traceparent: str | None) -> int:
        """The prefetch as a span of the boot's trace (BootRequested carries it)."""
        with tracer.start_as_current_span(
            "prefetch",
            context=context_from_traceparent(traceparent),
            attributes={
                "streamboot.vdisk": str(info["vdisk"]),
                "streamboot.version": int(info["version"]),
            },
        ) as span:
            fetched = await self.prefetch(info)
            span.set_attribute("streamboot.bytes", fetched)
            return fetched

    def _version_for(self, vdisk: str | None, version: int | None) -> dict[str, Any] | None:
        """The booting version as a stream node described it (its newest, when the boot did
        not say which); versions served before a restart of this service count too."""
        seen = [vc.info for vc in self.reads.versions.values()]
        seen += list(self.reads.local.values()) + self.reads.known()
        cands = [
            info
            for info in seen
            if info.get("vdisk") == vdisk and (version is None or info.get("version") == version)
        ]
        return max(cands, key=lambda i: int(i.get("version") or 0), default=None)

    async def prefetch(self, info: dict[str, Any]) -> int:
        """Warm the version's boot profile: into the read cache (a remote store), or into the
        page cache (a local one). PrefetchCompleted says how much and how long."""
        vdisk, version = str(info["vdisk"]), int(info["version"])
        extents = self.profiles.extents(vdisk, version)
        if not extents:
            return 0
        started = time.perf_counter()
        try:
            if info.get("store", "local") == "local":
                local = self.stores["local"]
                layers = [Path(local.layer(vdisk, str(p))) for p in info["layers"]]
                fetched = await asyncio.to_thread(warm_local, layers, extents)
            else:
                fetched = await self._prefetch_remote(await self.reads.open(info), extents)
        except (StoreError, OSError, ValueError) as e:
            log.error("prefetch of %s@%s failed: %s", vdisk, version, e)
            return 0
        ms = (time.perf_counter() - started) * 1000
        self.prefetches += 1
        log.info("prefetched %s@%s: %d bytes in %.0f ms", vdisk, version, fetched, ms)
        self.emit(PrefetchCompleted(vdisk=vdisk, version=version, bytes=fetched, duration_ms=ms))
        return fetched

    async def _prefetch_remote(self, vc: VersionCache, extents: list[tuple[int, int]]) -> int:
        """Fill the read cache from the store; returns the bytes fetched from the store."""
        before = self.reads.store_bytes
        sem = asyncio.Semaphore(8)

        async def one(o: int, n: int) -> None:
            async with sem:
                await self.reads.ensure(vc, o, min(n, vc.size - o))

        await asyncio.gather(*(one(o, n) for o, n in extents if o < vc.size))
        self.reads.evict()
        return self.reads.store_bytes - before
