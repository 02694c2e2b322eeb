"""Where the hand-off finds what ``/ipxe/script`` decided: two NATS KV buckets.

The registry keeps only a hash of each session token and the boot service keeps no state of
its own, so the state any boot replica needs later lives here:

- ``streamboot_boot_nonces``: one entry per kernel-direct boot, keyed by a one-time nonce
  that the script puts on the kernel command line. It holds the session's export (its
  token), the client's address and its identity, and expires after :data:`NONCE_TTL_S`.
  Redeeming it replaces the entry with a tombstone (no token) by a compare-and-set on the
  entry's revision, so of two concurrent redeems on two replicas exactly one wins.
- ``streamboot_boot_handoff``: per MAC, the session id, the client's address and the
  boot's trace root (never the token), for ``/booted`` and the hand-off's spans.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.bus import key_value_bucket

BOOTS_BUCKET = "streamboot_boot_handoff"
BOOTS_TTL_S = 24 * 3600.0  # a stale pointer is harmless (sessions are checked), just tidied
NONCES_BUCKET = "streamboot_boot_nonces"
# From the script to the initramfs asking: the kernel and initramfs download and the
# kernel's start, on a slow machine or network; a tombstone is kept as long.
NONCE_TTL_S = 600.0
NONCE_BYTES = 24  # 32 URL-safe characters: [A-Za-z0-9_-]

Outcome = Literal["ok", "unknown", "redeemed", "wrong-address"]


def key(mac: str) -> str:
    return mac.lower().replace(":", "-")  # KV keys allow no colons


def new_nonce() -> str:
    return secrets.token_urlsafe(NONCE_BYTES)


@dataclass(frozen=True)
class Redeemed:
    outcome: Outcome
    entry: dict[str, Any] | None = None


class HandoffStore:
    def __init__(self, boots: KeyValue, nonces: KeyValue) -> None:
        self.boots, self.nonces = boots, nonces

    @classmethod
    async def open(cls, js: JetStreamContext) -> HandoffStore:
        return cls(
            await key_value_bucket(js, BOOTS_BUCKET, BOOTS_TTL_S),
            await key_value_bucket(js, NONCES_BUCKET, NONCE_TTL_S),
        )

    async def put_boot(self, mac: str, record: dict[str, Any]) -> None:
        """What ``/booted`` and the spans need of a MAC's latest boot (no secrets)."""
        await self.boots.put(key(mac), json.dumps(record).encode())

    async def get_boot(self, mac: str) -> dict[str, Any] | None:
        return await _get(self.boots, key(mac))

    async def issue(self, record: dict[str, Any]) -> str:
        """A new nonce for ``record`` (the session's export and the client's address)."""
        nonce = new_nonce()
        await self.nonces.create(nonce, json.dumps(record).encode())
        return nonce

    async def redeem(self, nonce: str, client_ip: str | None) -> Redeemed:
        """Use ``nonce`` once: the entry when it is fresh and ``client_ip`` is the address
        it was issued to (None: any address). A wrong address leaves the nonce unused."""
        try:
            got = await self.nonces.get(nonce)
        except KeyNotFoundError:
            return Redeemed("unknown")
        entry = json.loads(got.value or b"null")
        if not isinstance(entry, dict):
            return Redeemed("unknown")
        if entry.get("redeemed"):
            return Redeemed("redeemed", entry)
        if client_ip is not None and entry.get("client_ip") != client_ip:
            return Redeemed("wrong-address", entry)
        tombstone = {"redeemed": True, "session_id": entry.get("session_id")}
        try:
            await self.nonces.update(nonce, json.dumps(tombstone).encode(), last=got.revision)
        except KeyWrongLastSequenceError:
            return Redeemed("redeemed", entry)  # another replica redeemed it just now
        return Redeemed("ok", entry)


async def _get(kv: KeyValue, name: str) -> dict[str, Any] | None:
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None
    value = json.loads(entry.value or b"null")
    return value if isinstance(value, dict) else None
