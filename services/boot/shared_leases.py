"""Full-DHCP leases shared by several boot services on one network: a NATS KV bucket.

The bucket ``streamboot_dhcp_leases`` holds one record per pool address (the key is the
address), so it never grows past the pool. Each boot service keeps the whole bucket in its
:class:`LeaseStore`, fed by one watch per process (read from memory: a DISCOVER costs no
bus round trip and no JetStream consumer), and decides offers from it as a single server
does. What it keeps (a bound lease, a release, a decline) is written with a compare-and-set
on the address's record: the revision the decision was made on. So two servers never bind
one address to two clients: the second write finds a newer revision, reads the record
(a direct get), and writes only when the address is still free for its client (the same
client's record, or an expired one); else its ACK becomes a NAK and the client asks again.

The watch only makes choices good, it is not what makes them safe: a stale view costs a
refused write, never a double lease. Offers stay in each server's memory, as on one server
(RFC 2131 lets a server not reserve what it offers); the REQUEST settles who gets the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.boot.dhcp_leases import Lease, LeaseStore, may_replace, write_leases
from shared.bus import follow_forever, key_value_bucket

log = logging.getLogger("streamboot.boot.dhcp")

LEASES_BUCKET = "streamboot_dhcp_leases"
# The watch is started again this often: its initial values re-read the whole bucket, so
# a watch that died quietly (JetStream restarted) costs a stale view for this long at most.
RESYNC_S = 300.0
# The local copy of the shared leases (for `streamboot dhcp leases`) is rewritten at most
# this often; it is a view, the bucket is what counts.
MIRROR_INTERVAL_S = 2.0


def parse_record(ip: str, value: bytes | None) -> Lease | None:
    """A bucket record as a lease; None when it is not one (the bucket is written by every
    boot service: a record is checked, not trusted)."""
    if not value:
        return None
    try:
        raw = json.loads(value)
        lease = Lease(
            mac=str(raw["mac"]),
            ip=str(raw["ip"]),
            expires=float(raw["expires"]),
            state=raw["state"],
            hostname=None if raw.get("hostname") is None else str(raw["hostname"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if lease.ip != ip or lease.state not in ("bound", "declined"):
        return None
    return lease


class SharedLeases:
    """A :class:`LeaseStore` kept in step with the bucket, and its writer (see
    ``dhcp_server.LeaseWriter``)."""

    interval_s = 0.05  # a lone ACK waits for nothing; a flood's changes go in batches

    def __init__(self, kv: KeyValue, store: LeaseStore) -> None:
        self.kv, self.store = kv, store
        self.where = f"the NATS bucket {LEASES_BUCKET}"
        self._synced = asyncio.Event()
        self._mirror_dirty = False
        self.stats = {"cas_retries": 0, "refused": 0, "bad_records": 0}

    @classmethod
    async def open(cls, js: JetStreamContext, store: LeaseStore) -> SharedLeases:
        """The bucket (created on first use, no TTL: a lease's expiry is in its record)."""
        return cls(await key_value_bucket(js, LEASES_BUCKET, None), store)

    # -- following the bucket ----------------------------------------------------------

    async def run(self) -> None:
        """Follow the bucket forever (watching again after an error, and every RESYNC_S)."""
        await follow_forever(self._follow, "dhcp: the shared lease watch", 1.0)

    async def synced(self) -> None:
        """Returns once the bucket's records are in the store (before answering anyone)."""
        await self._synced.wait()

    async def _follow(self) -> None:
        watcher = await self.kv.watch(">")
        deadline = time.monotonic() + RESYNC_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)
                except NatsTimeoutError:
                    break  # the time to watch again
                if entry is KeyValue.KeyWatcher.STOP_ITER:
                    break
                if entry is None:  # the end of the initial values
                    self._synced.set()
                    continue
                self.apply(entry.key, entry.value, entry.revision, entry.operation)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def apply(self, key: str, value: bytes | None, revision: int, op: str | None) -> None:
        if op in ("DEL", "PURGE"):
            self.store.apply(key, None, revision)
        elif (lease := parse_record(key, value)) is not None:
            self.store.apply(key, lease, revision)
        else:
            self.stats["bad_records"] += 1
            log.warning("dhcp: ignoring a malformed shared lease record for %r", key)
            return
        self._mirror_dirty = True

    # -- writing -------------------------------------------------------------------------

    async def commit(self) -> set[str]:
        changes = self.store.take_changes()
        results = await asyncio.gather(
            *(self._write(lease, rev) for lease, rev in changes.values()), return_exceptions=True
        )
        refused: set[str] = set()
        failed: BaseException | None = None
        for (ip, (lease, rev)), result in zip(changes.items(), results, strict=True):
            if isinstance(result, BaseException):
                failed = result
                # Kept for the next commit, unless a newer change to the address came meanwhile.
                self.store.changed.setdefault(ip, (lease, rev))
                self.store.dirty = True
            elif not result:
                refused.add(ip)
        if refused:
            self.stats["refused"] += len(refused)
            self._mirror_dirty = True
        if failed is not None:
            raise failed
        self._mirror_dirty = True
        return refused

    async def _write(self, lease: Lease, revision: int) -> bool:
        """Write ``lease`` over the record at ``revision``; when another server wrote since,
        once more over the newer record if that one leaves the address to this client.
        False when it does not (the store then holds that server's record)."""
        value = json.dumps(asdict(lease)).encode()
        try:
            seq = await self.kv.update(lease.ip, value, last=revision)
        except KeyWrongLastSequenceError:
            pass
        else:
            # The store holds the lease already (unless a newer local change replaced it).
            self.store.revisions[lease.ip] = max(self.store.revisions.get(lease.ip, 0), seq)
            return True
        self.stats["cas_retries"] += 1
        try:
            entry = await self.kv.get(lease.ip)
            current, current_rev = parse_record(lease.ip, entry.value), entry.revision or 0
        except KeyNotFoundError as exc:  # deleted: its tombstone's revision is in the error
            current, current_rev = None, _deleted_revision(exc)
        if current_rev:
            self.store.apply(lease.ip, current, current_rev)
        if not may_replace(lease, current, time.time()):
            return False
        try:
            seq = await self.kv.update(lease.ip, value, last=current_rev)
        except KeyWrongLastSequenceError:
            return False  # a third write in between: the client asks again
        self.store.apply(lease.ip, lease, seq)
        return True

    # -- the local copy ------------------------------------------------------------------

    async def mirror(self) -> None:
        """Keep the local lease file a copy of the shared leases, for the CLI."""
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            if not self._mirror_dirty:
                continue
            self._mirror_dirty = False
            try:
                await asyncio.to_thread(write_leases, self.store.path, self.store.snapshot())
            except OSError as exc:
                log.warning("dhcp: cannot write the copy %s (%s)", self.store.path, exc)


def _deleted_revision(exc: Any) -> int:
    entry = getattr(exc, "entry", None)
    return int(getattr(entry, "revision", 0) or 0)
