"""For a vdisk in the local store: tell the cache service this version is served here, and
warm the page cache with the version's boot profile as the session starts.

Reads are untouched: this layer does not override ``map_read``, so :class:`Layer` binds the
chain's own ``map_read`` and the hot path never calls into it. Its only work starts at
``attach``, in the background (a hint must not hold up the client's open): one
``rc.open`` (the cache then knows the version's layers, so a later BootRequested for it
can be prefetched) and
``posix_fadvise(WILLNEED)`` over the profile's pieces, which starts the kernel's reads
without waiting for them. A failure here never fails a session.

Once per version per node every ``WARM_EVERY_S`` (``CacheLink.should_warm``), not once per
session: the page cache is the node's, and a storm of sessions of one version needs one
``rc.open``, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import os

from services.stream.path.backend import Backend, Layer
from services.stream.path.cached_store import CacheLink, read_cache_body, version_key
from services.stream.spec import ExportSpec
from shared.contracts.cache import wire
from shared.vdisk_layout import ZERO_FD

log = logging.getLogger(__name__)


class ProfileHint(Layer):
    def __init__(self, next_: Backend, spec: ExportSpec, link: CacheLink) -> None:
        super().__init__(next_)
        self.spec = spec
        self.link = link
        self._hint: asyncio.Task[None] | None = None

    async def attach(self) -> None:
        if self.link.should_warm(version_key(self.spec)):
            self._hint = asyncio.get_running_loop().create_task(self._warm())
        await self.next.attach()

    def close(self) -> None:
        if self._hint is not None and not self._hint.done():
            self._hint.cancel()  # before the chain's files close under its fadvise
            self.link.warm_failed(version_key(self.spec))  # the next session warms
        super().close()

    async def _warm(self) -> None:
        s = self.spec
        try:
            reply = await self.link.client.request_json(wire.RC_OPEN, read_cache_body(s))
            self._advise(reply.get("profile", []))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            # A hint: the session goes on without it, and says why once; the next one tries.
            log.warning("no boot profile for %s@%s: %s", s.vdisk, s.version, e)
            self.link.warm_failed(version_key(s))

    def _advise(self, profile: list[list[int]]) -> None:
        for off, n in profile:
            n = min(int(n), self.size - int(off))
            if n <= 0:
                continue
            for fd, at, m in self.next.map_read(int(off), n):
                if fd != ZERO_FD:
                    os.posix_fadvise(fd, at, m, os.POSIX_FADV_WILLNEED)
