"""Where the hand-off endpoint finds a client's session token: a NATS KV bucket.

The registry keeps only a hash of each session token, and the boot service keeps no state
of its own; so when ``/ipxe/script`` opens a session it records the export here, keyed by
MAC, for ``/handoff`` to find later on whichever boot replica the initramfs reaches. The
entry is only a pointer: ``/handoff`` answers only while the registry still resolves the
token to a live session of that same MAC.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.boot.registry_client import Session
from shared.bus import key_value_bucket

BUCKET = "streamboot_boot_handoff"
TTL_S = 24 * 3600.0  # a stale pointer is harmless (the registry check fails), just tidied


def key(mac: str) -> str:
    return mac.lower().replace(":", "-")  # KV keys allow no colons


class HandoffStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> HandoffStore:
        return cls(await key_value_bucket(js, BUCKET, TTL_S))

    async def put(self, mac: str, session: Session) -> None:
        await self.kv.put(key(mac), json.dumps(asdict(session)).encode())

    async def get(self, mac: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(key(mac))
        except KeyNotFoundError:
            return None
        return json.loads(entry.value or b"null")
