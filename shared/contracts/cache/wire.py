"""What the stream and cache services say to each other over NATS (raw nats-py, no FastStream).

Why raw nats-py and a binary framing: a block write crosses the bus before the client gets
its acknowledgement, so the cost per message counts, and FastStream's per-message work is
a large part of it (docs/architecture.md has the figures). Messages stay <= 1 MiB (NATS's
default max payload outside our embedded config).

Subjects. In the queue group ``cache`` (any one cache node answers):

- ``streamboot.cache.wc.open``   JSON {key, session_id, size, kind, persistence, vdisk, version,
                                 mac, create, stream_node, stream_instance} -> {node,
                                 blocks, runs: the map's dirty and zeroed block runs
                                 (block_map.encode_runs; "" for a clean cache), used,
                                 capacity, incarnation (hex), synced: whether an fsync
                                 covers every change}. The node that answers routes
                                 the open to the node holding (or placed to hold) the key
                                 (the cache service's ``placement.py``); ``node`` says which one
                                 that is. ``create: false`` (the registry's ``vdisk commit``):
                                 a key no node holds is an error, not a new empty cache.
- ``streamboot.cache.rc.open``   JSON {key, vdisk, version, store, layers, size} -> {profile: [[off, len]...]}
- ``streamboot.cache.rc.read``   JSON {key, offset, length, and the rc.open fields} ->
                                 status-prefixed bytes (the fields let any node open the
                                 version's read cache on its first read of it)

Per node (``streamboot.cache.node.<node>.<verb>``, only that node answers; the session talks
to its write cache's node through these for its whole life):

- ``wc.open``   as above, ``hops`` > 0: an open routed here by another cache node
- ``wc.write``  binary batch (below) -> the node process's incarnation (INCARNATION
                bytes, new at each start), then one status byte (errno, 0 = ok) per record
- ``wc.read``   JSON {key, offset, length} -> status-prefixed bytes
- ``stats``     as ``streamboot.cache.stats``

Every cache node, no queue group (scatter-gather: ``client.gather``; a plain request gets
the first node's answer):

- ``streamboot.cache.wc.list``   JSON {} -> {node, caches: [{key, session_id, used, capacity,
                                 kind, persistence, zeroed, node}]}
- ``streamboot.cache.stats``     JSON {} -> {node, read cache figures, write caches, profiles, peers}

Published by the node holding a write cache, to every stream node (no reply):

- ``streamboot.cache.wc.attached``  JSON {key, session_id, stream_node, stream_instance}: a
                                 stream process (``stream_instance``, one id per process)
                                 opened write cache ``key`` for a session. Any other stream
                                 process still holding a session on that cache drops it: its
                                 mirror no longer sees the writes made through the new one
                                 (the stream service's ``takeover.py``).

Write batch: ``<H`` key length, the key (utf-8), ``<H`` writer length, the writer (utf-8:
the sending stream process, its ``CacheLink.instance``), then records ``<BBQI`` (op, flags,
offset, length), each WRITE record followed by its ``length`` bytes of data. Records are
applied in order; a batch with a SYNC record is fsynced before the reply. A cache attached
by a stream process refuses the batches of any other writer (EBUSY each): a process the
session moved away from cannot write over it (fencing).

Status-prefixed reply: ``b"\\0" + data``, or ``b"\\1" + JSON {"error", "kind"}``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

from shared.bus import subject_token

PREFIX = "streamboot.cache"
WC_OPEN = f"{PREFIX}.wc.open"
WC_LIST = f"{PREFIX}.wc.list"
WC_ATTACHED = f"{PREFIX}.wc.attached"
RC_OPEN = f"{PREFIX}.rc.open"
RC_READ = f"{PREFIX}.rc.read"
STATS = f"{PREFIX}.stats"
QUEUE = "cache"
# Per-node subjects: f"{NODE_PREFIX}.<escaped node id>.<verb>" (:func:`node_subject`).
NODE_PREFIX = f"{PREFIX}.node"
V_WC_OPEN, V_WC_WRITE, V_WC_READ, V_STATS = "wc.open", "wc.write", "wc.read", "stats"
V_WC_MAP = "wc.map"
NODE_VERBS = (V_WC_OPEN, V_WC_WRITE, V_WC_READ, V_WC_MAP, V_STATS)
# Every subject of the cache service (per-node ones with ``<node>`` standing for the node),
# for the permissions and the docs.
SUBJECTS = (
    WC_OPEN,
    RC_OPEN,
    RC_READ,
    WC_LIST,
    STATS,
    WC_ATTACHED,
    *(f"{NODE_PREFIX}.<node>.{verb}" for verb in NODE_VERBS),
)


def node_subject(node: str, verb: str) -> str:
    """``streamboot.cache.node.<node>.<verb>``: only that node answers."""
    return f"{NODE_PREFIX}.{subject_token(node)}.{verb}"


def kept_write_cache_key(mac: str, vdisk: str, version: int) -> str:
    """The key of a device's kept write cache for one vdisk version: the MAC without
    separators, lower-cased, so every spelling of one MAC names one cache. The registry
    stores MACs lower-cased (``normalize_mac``), so keys of caches kept before this
    function existed are the same strings."""
    return f"device-{mac.replace(':', '').lower()}-{vdisk}-v{version}"


# Largest message we send: under NATS's 1 MiB default with room for headers.
MAX_MESSAGE = (1 << 20) - 4096
# Largest data of one WRITE record / one read reply.
MAX_CHUNK = 512 * 1024
# Runs of a write cache's map per reply (wc.open, then wc.map from where it stopped): at
# most 17 bytes a run before zlib and base64, so a page stays under MAX_MESSAGE even when
# nothing compresses. A cache kept across many boots can gather more than one message holds.
MAP_PAGE_RUNS = 32768

# A cache node process's id, new at each start, first in every write reply: a stream node
# that sees it change knows the node restarted (and may have lost what it had not fsynced).
INCARNATION = 8

OP_WRITE, OP_ZERO, OP_FLUSH = 1, 2, 3
FLAG_SYNC = 1
RECORD = struct.Struct("<BBQI")
KEYLEN = struct.Struct("<H")


def batch_prefix(key: str, writer: str = "") -> bytes:
    kb, wb = key.encode(), writer.encode()
    return KEYLEN.pack(len(kb)) + kb + KEYLEN.pack(len(wb)) + wb


Records = list[tuple[int, int, int, int, memoryview | None]]


def parse_batch(payload: bytes) -> tuple[str, str, Records]:
    """``(key, writer, [(op, flags, offset, length, data|None)])``; ValueError on a
    malformed batch."""
    view = memoryview(payload)
    try:
        (klen,) = KEYLEN.unpack_from(view, 0)
        key = bytes(view[2 : 2 + klen]).decode()
        pos = 2 + klen
        (wlen,) = KEYLEN.unpack_from(view, pos)
        writer = bytes(view[pos + 2 : pos + 2 + wlen]).decode()
        pos += 2 + wlen
        records: Records = []
        while pos < len(view):
            op, flags, offset, length = RECORD.unpack_from(view, pos)
            pos += RECORD.size
            data = None
            if op == OP_WRITE:
                if pos + length > len(view):
                    raise ValueError("write record runs past the end of the batch")
                data = view[pos : pos + length]
                pos += length
            records.append((op, flags, offset, length, data))
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"malformed write batch: {e}") from e
    return key, writer, records


def ok(data: bytes | memoryview = b"") -> bytes:
    return b"\0" + bytes(data)


def fail(error: str, kind: str = "error") -> bytes:
    return b"\1" + json.dumps({"error": error, "kind": kind}).encode()


class CacheError(OSError):
    """The cache service answered with an error; ``kind`` says which."""

    def __init__(self, errno_: int, message: str, kind: str = "error") -> None:
        super().__init__(errno_, message)
        self.kind = kind


# Kinds of CacheError that say nothing about the request itself: the node did not answer
# (gone, restarting, stopped) or the bus was away. The same request may succeed later.
TRANSIENT_KINDS = frozenset({"not_alive", "timeout", "bus"})


def transient(e: BaseException) -> bool:
    return isinstance(e, CacheError) and e.kind in TRANSIENT_KINDS


def unwrap(reply: bytes) -> bytes:
    """The data of a status-prefixed reply, or :class:`CacheError`."""
    import errno

    if reply[:1] == b"\0":
        return reply[1:]
    try:
        body = json.loads(reply[1:])
    except ValueError:
        body = {"error": "malformed reply from the cache service", "kind": "internal"}
    kind = body.get("kind", "error")
    code = {"not_found": errno.ESTALE, "invalid": errno.EINVAL}.get(kind, errno.EIO)
    raise CacheError(code, f"cache service: {body.get('error')}", kind)


def chunks(offset: int, length: int, step: int = MAX_CHUNK) -> Iterator[tuple[int, int]]:
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n
