"""The shared read cache's requests (``rc.open``, ``rc.read``): any cache node answers
(queue group). Part of the cache service (service.py wires it)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg

from services.cache.boot_profiles import BootProfiles
from services.cache.read_cache import ReadCaches
from services.cache.stores import StoreError
from shared.bus import RemoteError, connection_mark, respond
from shared.contracts.cache import wire
from shared.contracts.cache.bodies import RcOpen, RcRead, parse

log = logging.getLogger("streamboot.cache")


class ReadCacheRoutes:
    def __init__(
        self,
        reads: ReadCaches,
        profiles: BootProfiles,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.reads = reads
        self.profiles = profiles
        self._spawn = spawn

    async def rc_open(self, raw: Any, _msg: Msg) -> dict[str, Any]:
        body = parse(RcOpen, raw, "read cache open")
        try:
            if body.local:
                self.reads.register_local(body.info())
            else:
                await self.reads.open(body.info())
        except (StoreError, OSError) as e:
            raise RemoteError(f"cannot open {body.key}: {e}", "unavailable") from e
        return {"profile": self.profiles.extents(body.vdisk, body.version)}

    async def rc_read(self, msg: Msg) -> None:
        mark = connection_mark(msg._client)
        try:
            body = parse(RcRead, json.loads(msg.data), "read")
            vc = self.reads.get(body.key)
            if vc is None and body.layers is not None:
                # Opened through another cache node: this one opens it at its first read.
                vc = await self.reads.open(body.info())
            if vc is None:
                reply = wire.fail(f"read cache {body.key!r} not open", "not_found")
            else:
                length = min(body.length, wire.MAX_CHUNK)
                reply = wire.ok(await self.reads.read(vc, body.offset, length))
        except RemoteError as e:
            reply = wire.fail(str(e), e.kind)
        except (StoreError, OSError) as e:
            log.error("read cache: store read failed: %s", e)
            reply = wire.fail(str(e), "unavailable")
        except (ValueError, KeyError) as e:
            reply = wire.fail(f"bad read: {e}", "invalid")
        await respond(msg, reply, mark)

    async def spawn_read(self, msg: Msg) -> None:
        self._spawn(self.rc_read(msg))
