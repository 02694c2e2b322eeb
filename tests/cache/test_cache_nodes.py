"""Several cache nodes: each write cache lives on one node, and every request about it must
reach that node. Two real cache services, real stream nodes, real NBD clients (qemu-io).

- sessions spread over both nodes (rendezvous placement) and read back exactly, also
  through another stream node (pulled from the node holding them);
- a kept cache is found again on the device's next session after its node restarts, and
  while that node is down the session gets a clear error, never a new empty cache;
- kill -9 of one node: its sessions' writes fail with an error naming it, the other
  node's sessions go on, a new session is placed on the living node;
- SessionClosed drops a ``discard`` cache on the node holding it;
- ``wc.list`` gathered from every node; the registry's ``vdisk commit`` reads a kept cache
  from its node.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from services.cache.placement import OWNERS_BUCKET, rank
from shared.bus import EVENTS_STREAM, subject_token
from shared.contracts.cache import wire
from shared.contracts.cache.client import all_write_caches, gather
from shared.contracts.cache.wire import node_subject
from streamboot.vdisk_commit import overlay_write_cache
from tests.cache.conftest import IMAGE_SIZE, System, cache_request, export, qemu_io
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(240)

# Written to every session (offset, length); the pattern byte is the session's own.
RANGES = [(0, 65536), (1_000_000, 5000), (3 * 1024 * 1024, 512 * 1024), (IMAGE_SIZE - 4096, 4096)]


def writes(pattern: int) -> list[str]:
    return [f"write -P {pattern} {o} {n}" for o, n in RANGES] + ["flush"]


def reads(pattern: int) -> list[str]:
    return [f"read -P {pattern} {o} {n}" for o, n in RANGES]


def dirty_bytes() -> int:
    """Bytes a session's cache holds after ``writes``: whole 4 KiB blocks."""
    blocks: set[int] = set()
    for o, n in RANGES:
        blocks.update(range(o // 4096, -(-(o + n) // 4096)))
    return len(blocks) * 4096


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


async def two_nodes(s: System, **b_settings: str) -> tuple[str, str]:
    """Cache nodes ``a`` and ``b`` (``b_settings``: its own), started and each knowing the
    other is alive."""
    await s.start_cache("a")
    await s.start_cache("b", **b_settings)
    a, b = s.node_id("a"), s.node_id("b")
    for _ in range(100):
        views = [await node_stats(s, n) for n in (a, b)]
        if all(set(v["peers"]) == {a, b} for v in views):
            return a, b
        await asyncio.sleep(0.1)
    raise AssertionError(f"the cache nodes never saw each other: {views}")


async def node_stats(s: System, node: str) -> dict[str, Any]:
    return await cache_request(s.nats_url, node_subject(node, wire.V_STATS), {})  # type: ignore[no-any-return]


async def held(s: System, node: str) -> dict[str, dict[str, Any]]:
    """The write caches ``node`` holds, by key."""
    return {w["key"]: w for w in (await node_stats(s, node))["write_caches"]}


def tokens_placed(prefix: str, nodes: list[str], per_node: int) -> dict[str, str]:
    """Session tokens (key ``session-<token>``) whose new caches rank first on each node:
    ``per_node`` for every node. Returns token -> node."""
    out: dict[str, str] = {}
    count = dict.fromkeys(nodes, 0)
    i = 0
    while min(count.values()) < per_node:
        token = f"{prefix}{i}"
        i += 1
        node = rank(f"session-{token}", nodes)[0]
        if count[node] < per_node:
            count[node] += 1
            out[token] = node
    return out


async def owner_record(nc: nats.NATS, key: str) -> str | None:
    record = await owner_entry(nc, key)
    return record["node"] if record else None


async def owner_entry(nc: nats.NATS, key: str) -> dict[str, Any] | None:
    kv = await nc.jetstream().key_value(OWNERS_BUCKET)
    try:
        entry = await kv.get(subject_token(key))
    except Exception:
        return None
    return json.loads(entry.value) if entry.value else None


def exports_of(tokens: Iterable[str], base: Path) -> dict[str, dict[str, Any]]:
    return {t: fields for token in tokens for t, fields in export(token, base).items()}


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")


async def test_sessions_spread_over_two_cache_nodes_and_read_back(
    system, base_image: Path, nc: nats.NATS
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    a, b = await two_nodes(s)
    placed = tokens_placed("sp", [a, b], 3)
    exports = exports_of(placed, base_image)
    _n1, uri1 = await s.start_node(exports, "s1")
    _n2, uri2 = await s.start_node(exports, "s2")
    patterns = {t: 0x20 + i for i, t in enumerate(placed)}
    # Every session writes through stream node 1, all at once.
    await asyncio.gather(
        *(asyncio.to_thread(qemu_io, f"{uri1}/{t}", *writes(patterns[t])) for t in placed)
    )
    # Placement: each cache on the node its key ranks first, both nodes used.
    on_a, on_b = await held(s, a), await held(s, b)
    assert set(on_a) == {f"session-{t}" for t, n in placed.items() if n == a}
    assert set(on_b) == {f"session-{t}" for t, n in placed.items() if n == b}
    for t, node in placed.items():
        assert await owner_record(nc, f"session-{t}") == node
        assert (on_a if node == a else on_b)[f"session-{t}"]["used"] == dirty_bytes()
    # Read back through stream node 2: it pulls each cache from the node holding it.
    await asyncio.gather(
        *(asyncio.to_thread(qemu_io, f"{uri2}/{t}", *reads(patterns[t])) for t in placed)
    )
    log2 = log_text(s.root / "s2.log")
    for t, node in placed.items():
        assert (
            f"write cache session-{t}: pulled {dirty_bytes()} dirty bytes from cache node {node}"
            in log2
        )
    # Bytes beside the unaligned write still come from the base image.
    base = await asyncio.to_thread(base_image.read_bytes)
    t0 = next(iter(placed))
    out = await asyncio.to_thread(qemu_io, f"{uri2}/{t0}", "read -v 1005000 16")
    assert base[1005000 : 1005000 + 4].hex() in out.replace(" ", "")
    # An open reaching the node that does not hold the key is routed to the one that does.
    ta = next(t for t, n in placed.items() if n == a)
    body = {"key": f"session-{ta}", "session_id": f"session-{ta}", "size": IMAGE_SIZE}
    reply = await cache_request(s.nats_url, node_subject(b, wire.V_WC_OPEN), body)
    assert reply["node"] == a and reply["used"] == dirty_bytes()
    assert f"session-{ta}" not in await held(s, b)
    # wc.list of every node, gathered.
    caches, complete = await all_write_caches(nc, {a, b})
    assert complete
    assert {(c["key"], c["node"], c["used"]) for c in caches} == {
        (f"session-{t}", n, dirty_bytes()) for t, n in placed.items()
    }
    # A plain request of the scatter subject still gets one node's whole answer.
    one = await cache_request(s.nats_url, wire.WC_LIST, {})
    assert one["node"] in (a, b) and len(one["caches"]) == 3


async def test_a_node_short_of_space_gets_no_new_cache_while_another_has_room(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    # Node b wants more free space than any disk has: it is short of room for both kinds.
    a, b = await two_nodes(s, cache_min_free_bytes=str(1 << 60))
    assert (await node_stats(s, b))["room"] == {"server-disk": False, "server-ram": False}
    assert (await node_stats(s, a))["room"] == {"server-disk": True, "server-ram": True}
    placed = tokens_placed("room", [a, b], 2)  # two keys rank b first
    _n, uri = await s.start_node(exports_of(placed, base_image), "s1")
    for token in placed:
        await asyncio.to_thread(
            qemu_io, f"{uri}/{token}", "write -P 0x33 0 64k", "read -P 0x33 0 64k"
        )
    assert set(await held(s, a)) == {f"session-{t}" for t in placed}
    assert not await held(s, b)
    assert "new ones go to other cache nodes while one has room" in log_text(s.cache_log("b"))


async def test_kept_cache_is_found_again_after_its_node_restarts(
    system, base_image: Path, nc: nats.NATS, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    a, b = await two_nodes(s)
    mac = "52:54:00:c0:ff:01"
    kept = {"write_cache_persistence": "keep", "mac": mac}
    exports = {
        **export("kr1", base_image, session_id="s-kr1", **kept),
        **export("kr2", base_image, session_id="s-kr2", **kept),
    }
    key = "device-525400c0ff01-golden-v1"
    owner = rank(key, [a, b])[0]
    name = "a" if owner == a else "b"
    other = b if owner == a else a
    _n1, uri1 = await s.start_node(exports, "s1")
    await asyncio.to_thread(qemu_io, f"{uri1}/kr1", *writes(0x5A))
    assert await owner_record(nc, key) == owner
    await s.close_session(database_url, "s-kr1")  # kept: outlives its session
    await asyncio.sleep(0.3)
    assert key in await held(s, owner)

    s.caches[name].kill9()
    # The device's next session while the node holding its writes is down: a clear error,
    # in the stream node's log and the living cache node's, and no new empty cache.
    # (Its open waits for that node for the outage grace, 1 s here, first.)
    _n2, uri2 = await s.start_node(exports, "s2", "--outage-grace", "1")
    out = await asyncio.to_thread(qemu_io, f"{uri2}/kr2", *reads(0x5A), expect_error=True)
    message = f"cache node {owner} holding write cache {key} is not alive"
    assert "Requested export not available" in out and message in out, out  # NBD's reason
    assert message in log_text(s.root / "s2.log")
    assert message in log_text(s.cache_log("b" if name == "a" else "a"))
    assert key not in await held(s, other)
    assert await owner_record(nc, key) == owner

    # The node comes back (same id, same disk): it recovers the cache, records itself as
    # its holder again, and the device's session finds every write.
    await s.start_cache(name)
    assert f"recovered write cache {key}" in log_text(s.cache_log(name))
    await asyncio.to_thread(qemu_io, f"{uri2}/kr2", *reads(0x5A))
    (wc,) = [w for k, w in (await held(s, owner)).items() if k == key]
    assert wc["session_id"] == "s-kr2" and wc["used"] == dirty_bytes()
    assert key not in await held(s, other)

    # `vdisk commit` reads it from its node, whichever node its open reaches first.
    source = {
        "write_cache_key": key,
        "session_id": "s-kr2",
        "vdisk": "golden",
        "version": 1,
        "size": IMAGE_SIZE,
        "mac": mac,
    }
    for i in range(4):
        image = s.root / f"commit{i}.raw"
        image.write_bytes(bytes(IMAGE_SIZE))
        applied = await overlay_write_cache(nc, source, image, lambda *_: None)
        assert applied == dirty_bytes()
        data = image.read_bytes()
        for o, n in RANGES:
            assert data[o : o + n] == bytes([0x5A]) * n
    # A kept cache no node holds is an error for commit, not an empty new cache.
    missing = {**source, "write_cache_key": "device-525400c0ff99-golden-v1"}
    with pytest.raises(OSError, match="no cache node holds write cache"):
        await overlay_write_cache(nc, missing, s.root / "commit0.raw", lambda *_: None)
    assert await owner_record(nc, "device-525400c0ff99-golden-v1") is None


async def test_kill9_of_one_cache_node_fails_only_its_sessions(
    system, base_image: Path, nc: nats.NATS
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    a, b = await two_nodes(s)
    placed = tokens_placed("k9", [a, b], 2)
    # One more session, opened after b died, whose key ranks first on b.
    late = next(t for t, n in tokens_placed("k9late", [a, b], 1).items() if n == b)
    exports = exports_of([*placed, late], base_image)
    # Writes to a node that does not answer wait this long for it (not the default 30 s).
    _n1, uri = await s.start_node(exports, "s1", "--outage-grace", "1")
    await asyncio.gather(*(asyncio.to_thread(qemu_io, f"{uri}/{t}", *writes(0x31)) for t in placed))
    s.caches["b"].kill9()

    for t, node in placed.items():
        if node == a:  # untouched: writes and reads go on
            await asyncio.to_thread(
                qemu_io, f"{uri}/{t}", "write -P 0x32 0 64k", "flush", "read -P 0x32 0 64k"
            )
        else:  # its writes are on b: EIO, and the log names the node
            out = await asyncio.to_thread(
                qemu_io, f"{uri}/{t}", "write -P 0x32 0 64k", expect_error=True
            )
            assert "Input/output error" in out, out
            assert f"cache node {b} holding write cache session-{t} is not alive" in log_text(
                s.root / "s1.log"
            )
    # A new session goes to the living node, even though its key ranks first on b.
    await asyncio.to_thread(qemu_io, f"{uri}/{late}", *writes(0x33), *reads(0x33))
    assert f"session-{late}" in await held(s, a)
    assert await owner_record(nc, f"session-{late}") == a
    # The gathered list says what it has and that b did not answer.
    caches, complete = await all_write_caches(nc, {a, b}, timeout_s=0.5)
    assert not complete
    assert {c["key"] for c in caches} == {
        f"session-{t}" for t, n in [*placed.items(), (late, a)] if n == a
    }


async def test_session_closed_drops_the_cache_on_the_node_holding_it(
    system, base_image: Path, nc: nats.NATS, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    a, b = await two_nodes(s)
    placed = tokens_placed("cl", [a, b], 3)
    exports = exports_of(placed, base_image)
    _n1, uri = await s.start_node(exports, "s1")
    await asyncio.gather(
        *(asyncio.to_thread(qemu_io, f"{uri}/{t}", "write -P 0x44 0 64k") for t in placed)
    )
    assert len(await held(s, a)) == 3 and len(await held(s, b)) == 3
    for t in placed:  # each SessionClosed published once, as the relay does
        await s.close_session(database_url, f"session-{t}")
    for _ in range(100):
        if not await held(s, a) and not await held(s, b):
            break
        await asyncio.sleep(0.05)
    assert await held(s, a) == {} and await held(s, b) == {}
    for t in placed:
        assert await owner_record(nc, f"session-{t}") is None
    for name in ("a", "b"):
        assert len(list((s.root / f"data-{name}" / "cache" / "write").iterdir())) == 0


async def test_a_session_closed_while_its_cache_node_was_down_is_dropped_when_it_returns(
    system, base_image: Path, nc: nats.NATS, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    a = s.node_id()
    cache = await s.start_cache()
    js = nc.jetstream()

    async def consumer_in_place() -> bool:  # its consumer of SessionClosed
        try:
            await js.consumer_info(EVENTS_STREAM, f"cache-closed-{subject_token(a)}")
        except NotFoundError:
            return False
        return True

    await wait_for(consumer_in_place, "the cache node's consumer of SessionClosed")
    _n1, uri = await s.start_node(export("down", base_image), "s1")
    await asyncio.to_thread(qemu_io, f"{uri}/down", "write -P 0x45 0 64k")
    assert "session-down" in await held(s, a)
    files = s.data / "cache" / "write"
    assert list(files.glob("session-down*"))
    cache.stop()  # a clean stop: its caches stay on disk for the next start
    await s.close_session(database_url, "session-down")  # nobody holding it is listening
    await s.start_cache()
    for _ in range(100):
        if "session-down" not in await held(s, a):
            break
        await asyncio.sleep(0.1)
    assert "session-down" not in await held(s, a)
    assert await owner_record(nc, "session-down") is None
    assert not list(files.glob("session-down*"))


async def test_a_cache_whose_files_are_lost_is_an_error_not_a_new_empty_cache(
    system, base_image: Path, nc: nats.NATS
) -> None:  # type: ignore[no-untyped-def]
    """Its node comes back without its files (a machine restart empties /dev/shm, a disk is
    replaced): the device's next session is refused, not given an empty cache."""
    s = system()
    await s.start_cache()
    kept = {
        "write_cache_persistence": "keep",
        "mac": "52:54:00:c0:ff:02",
        "write_cache": "server-ram",
    }
    exports = {
        **export("lf1", base_image, session_id="s-lf1", **kept),
        **export("lf2", base_image, session_id="s-lf2", **kept),
    }
    key = "device-525400c0ff02-golden-v1"
    _n1, uri1 = await s.start_node(exports, "s1")
    await asyncio.to_thread(qemu_io, f"{uri1}/lf1", *writes(0x66))
    for _ in range(50):  # the holder notes in its record that the cache has data
        if (await owner_entry(nc, key) or {}).get("written"):
            break
        await asyncio.sleep(0.1)
    assert (await owner_entry(nc, key) or {}).get("written"), await owner_entry(nc, key)
    s.cache.kill9()  # type: ignore[union-attr]
    for f in (s.root / "shm").iterdir():  # the machine restarted: tmpfs is empty
        f.unlink()
    await s.start_cache()
    _n2, uri2 = await s.start_node(exports, "s2")
    out = await asyncio.to_thread(qemu_io, f"{uri2}/lf2", *reads(0x66), expect_error=True)
    message = f"write cache {key} held by cache node {s.node_id()} had data, but its files are gone"
    assert message in out, out
    assert message in log_text(s.cache_log())
    assert key not in await held(s, s.node_id())


async def test_gather_without_any_cache_node_is_an_error(nc: nats.NATS) -> None:
    with pytest.raises(OSError, match="no responders"):
        await gather(nc, "streamboot.cache.test.nobody", {}, timeout_s=2.0)
