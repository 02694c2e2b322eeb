"""The address pool of full-DHCP mode and its leases, kept in a JSON file across restarts.

Only what was acknowledged is kept: a bound lease (after an ACK), a release, a decline.
An offer lives in memory only: a DISCOVER costs no write, and an offer that nobody takes
up is worth nothing after a restart (the client starts over with a DISCOVER). Changing the
store marks it ``dirty``; the server writes the file (:func:`write_leases`: a temp file,
fsynced, renamed over the old one, the folder fsynced) before it sends the ACKs that the
change answers, so a crash never loses a lease a client was told it has.

Every pool address has at most one record, found by MAC and by address in O(1); the
address to offer next comes from heaps (free addresses in pool order, records by expiry,
offers and declines by age), so a DISCOVER costs O(log n) however large the pool, also
when a flood of forged MACs has every address on offer. Heap entries are checked when they
come to the top (a record replaced since is skipped) and rebuilt when stale ones pile up.

Several boot services on one network share their leases instead (``shared_leases.py``):
the store is then their common view, fed by a watch, and each change it records
(:attr:`LeaseStore.changed`) carries the revision of the address's shared record it was
decided on, so the write is a compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

# An offer holds its address this long for the client's REQUEST, while free addresses last;
# once none is left, the oldest offer nobody took up goes to the next DISCOVER.
OFFER_HOLD_S = 30.0
# A declined address (in use on the network: the client's ARP check) stays out this long.
DECLINE_HOLD_S = 600.0

# A heap entry: (expires, tie-breaker, the record); stale once the record is not its
# address's record any more, or its expiry changed.
_Entry = tuple[float, int, "Lease"]


@dataclass
class Lease:
    mac: str  # the client's MAC; "declined:<ip>" for a declined address
    ip: str
    expires: float  # epoch seconds
    state: Literal["offered", "bound", "declined"]
    hostname: str | None = None


class PoolExhausted(Exception):
    pass


class LeaseStore:
    def __init__(self, path: Path, pool_start: str, pool_end: str, *, load: bool = True) -> None:
        self.path = path
        start, end = ipaddress.IPv4Address(pool_start), ipaddress.IPv4Address(pool_end)
        if end < start:
            raise ValueError(f"empty DHCP pool {pool_start}-{pool_end}")
        self.pool = [str(ipaddress.IPv4Address(n)) for n in range(int(start), int(end) + 1)]
        self._index = {ip: i for i, ip in enumerate(self.pool)}
        self.by_mac: dict[str, Lease] = {}
        self.by_ip: dict[str, Lease] = {}
        self.dirty = False  # a change to what the file keeps, not yet written
        self._free = list(range(len(self.pool)))  # pool indexes, a heap (ascending: a heap)
        self._by_expiry: list[_Entry] = []
        self._offers: list[_Entry] = []
        self._declines: list[_Entry] = []
        self._seq = itertools.count()
        # The shared store's view: per address, the revision of its last record seen there,
        # and the changes not yet written there (address -> the record, the revision it
        # was decided on). The file alone leaves both unused.
        self.revisions: dict[str, int] = {}
        self.changed: dict[str, tuple[Lease, int]] = {}
        if load:
            self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        for item in raw.get("leases", []):
            lease = Lease(**item)
            if lease.state != "offered" and lease.ip in self._index:
                self._put(lease)

    def _change(self, lease: Lease) -> None:
        """Note a change to keep (written before the ACK that tells of it leaves)."""
        self.dirty = True
        prior = self.changed.get(lease.ip)
        self.changed[lease.ip] = (lease, prior[1] if prior else self.revisions.get(lease.ip, 0))

    def take_changes(self) -> dict[str, tuple[Lease, int]]:
        """The changes to write now (later ones wait for the next write)."""
        changes, self.changed, self.dirty = self.changed, {}, False
        return changes

    def apply(self, ip: str, lease: Lease | None, revision: int) -> None:
        """The shared record of ``ip`` at ``revision`` (None: deleted), unless this store
        already saw that revision or a later one."""
        if ip not in self._index or revision <= self.revisions.get(ip, 0):
            return
        self.revisions[ip] = revision
        if lease is not None:
            self._put(lease)
        elif (old := self.by_ip.get(ip)) is not None and old.state != "offered":
            self._drop(old)

    def snapshot(self) -> list[dict[str, Any]]:
        """What the file keeps: every record but the offers."""
        return [asdict(x) for x in self.by_mac.values() if x.state != "offered"]

    def _put(self, lease: Lease) -> None:
        """Make ``lease`` its MAC's record and its address's record (dropping the ones before)."""
        for old in (self.by_mac.get(lease.mac), self.by_ip.get(lease.ip)):
            if old is not None:
                self._drop(old)
        self.by_mac[lease.mac] = lease
        self.by_ip[lease.ip] = lease
        self._schedule(lease)

    def _schedule(self, lease: Lease) -> None:
        entry = (lease.expires, next(self._seq), lease)
        heapq.heappush(self._by_expiry, entry)
        if lease.state == "offered":
            heapq.heappush(self._offers, entry)
        elif lease.state == "declined":
            heapq.heappush(self._declines, entry)
        if len(self._by_expiry) > 4 * len(self.by_ip) + 1024:
            self._rebuild()

    def _rebuild(self) -> None:
        """The heaps from the live records alone (stale entries piled up)."""
        entries = [(x.expires, next(self._seq), x) for x in self.by_ip.values()]
        self._by_expiry = sorted(entries)
        self._offers = sorted(e for e in entries if e[2].state == "offered")
        self._declines = sorted(e for e in entries if e[2].state == "declined")
        self._free = [i for i, ip in enumerate(self.pool) if ip not in self.by_ip]

    def _drop(self, lease: Lease) -> None:
        if self.by_mac.get(lease.mac) is lease:
            del self.by_mac[lease.mac]
        if self.by_ip.get(lease.ip) is lease:
            del self.by_ip[lease.ip]
            heapq.heappush(self._free, self._index[lease.ip])

    def _top(self, heap: list[_Entry]) -> Lease | None:
        """The heap's first live record (dropping stale entries on the way)."""
        while heap:
            expires, _, lease = heap[0]
            if self.by_ip.get(lease.ip) is lease and lease.expires == expires:
                return lease
            heapq.heappop(heap)
        return None

    def _first_free(self) -> str | None:
        while self._free:
            ip = self.pool[self._free[0]]
            if ip not in self.by_ip:
                return ip
            heapq.heappop(self._free)
        return None

    def _holder(self, ip: str, now: float) -> Lease | None:
        lease = self.by_ip.get(ip)
        return lease if lease is not None and lease.expires > now else None

    def choose(self, mac: str, requested: str | None, now: float) -> str:
        """The address to offer ``mac``: its own lease (even expired), the one it asks for if
        free, else the first never used, else the longest expired, else the oldest offer
        nobody took up, else the oldest declined one."""
        own = self.by_mac.get(mac)
        if own is not None and own.state != "declined":
            return own.ip
        if requested in self._index and self._holder(requested, now) is None:
            return requested  # type: ignore[return-value]
        if (ip := self._first_free()) is not None:
            return ip
        oldest = self._top(self._by_expiry)
        if oldest is not None and oldest.expires <= now:
            return oldest.ip
        for heap in (self._offers, self._declines):
            if (lease := self._top(heap)) is not None:
                return lease.ip
        raise PoolExhausted(f"every address in {self.pool[0]}-{self.pool[-1]} is bound")

    def offer(self, mac: str, requested: str | None, now: float) -> Lease:
        """An address for a DISCOVER (in memory: an offer is never written)."""
        ip = self.choose(mac, requested, now)
        own = self.by_mac.get(mac)
        if own is not None and own.ip == ip and own.state == "bound" and own.expires > now:
            return own  # a bound client asking again keeps its lease as it is
        lease = Lease(mac, ip, now + OFFER_HOLD_S, "offered", own.hostname if own else None)
        self._put(lease)
        return lease

    def bind(
        self, mac: str, ip: str, lease_s: float, now: float, hostname: str | None
    ) -> Lease | None:
        """Confirm a REQUEST for ``ip``; None when that address is not the client's to take.
        An offer to another client does not stop it: servers need not reserve an offered
        address (RFC 2131 3.1), and a flood of DISCOVERs must not keep a real client out."""
        if ip not in self._index:
            return None
        holder = self._holder(ip, now)
        if holder is not None and holder.mac != mac and holder.state != "offered":
            return None
        own = self.by_mac.get(mac)
        lease = Lease(mac, ip, now + lease_s, "bound", hostname or (own.hostname if own else None))
        self._put(lease)
        self._change(lease)
        return lease

    def release(self, mac: str, now: float) -> None:
        lease = self.by_mac.get(mac)
        if lease is not None and lease.state == "bound":
            lease.expires = now  # kept: the client gets the same address next time
            self._schedule(lease)
            self._change(lease)

    def decline(self, mac: str, ip: str, now: float) -> bool:
        """The client found ``ip`` in use (ARP): keep it out of the pool for a while. Only
        the client the address was offered or bound to may say so (RFC 2131 3.1: the client
        that received the address declines it); False for anyone else."""
        holder = self.by_ip.get(ip)
        if holder is None or holder.mac != mac:
            return False
        declined = Lease(f"declined:{ip}", ip, now + DECLINE_HOLD_S, "declined")
        self._put(declined)
        self._change(declined)
        return True

    def leases(self) -> list[Lease]:
        return sorted(self.by_mac.values(), key=lambda x: ipaddress.IPv4Address(x.ip))


def may_replace(change: Lease, current: Lease | None, now: float) -> bool:
    """Whether ``change`` may be written over ``current``, the shared record another
    server wrote meanwhile: the same client's, or one no longer held."""
    return current is None or current.mac == change.mac or current.expires <= now


class LeaseWriter(Protocol):
    """Where a store's changes are kept: :class:`FileLeases`, or the shared bucket."""

    store: LeaseStore
    where: str  # for the log
    interval_s: float  # at most one commit this often: a flood's changes are batched

    async def commit(self) -> set[str]:
        """Keep the changes made so far; the addresses whose change another server's
        record refused (their ACKs become NAKs). OSError/BusError: nothing kept, the
        changes wait for the next commit."""
        ...


class FileLeases:
    """The single-node store: the lease file, rewritten whole."""

    interval_s = 0.5

    def __init__(self, store: LeaseStore) -> None:
        self.store = store
        self.where = str(store.path)

    async def commit(self) -> set[str]:
        snapshot = self.store.snapshot()
        self.store.take_changes()
        try:
            await asyncio.to_thread(write_leases, self.store.path, snapshot)
        except OSError:
            self.store.dirty = True  # the next change tries again
            raise
        return set()


def write_leases(path: Path, snapshot: list[dict[str, Any]]) -> None:
    """Replace the lease file atomically and durably: after a crash or a power cut the file
    is the old one or the new one, whole (a thread may run it: it reads only ``snapshot``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"leases": snapshot}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".leases-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
