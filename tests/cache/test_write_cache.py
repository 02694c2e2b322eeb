"""Write caches held by the cache service: failover between stream nodes, kill -9 of the
cache service, a full cache, a dropped cache; each through real NBD clients."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from tests.cache.conftest import IMAGE_SIZE, System, export, qemu_io, rss_mib
from tests.conftest import start_nats
from tests.stream.nbdraw import RawNbd

# (offset, length, pattern) written through node A; 0 = write-zeroes.
WRITES = [
    (0, 65536, 0x11),
    (1_000_000, 5000, 0x22),  # unaligned: read-modify-write of two blocks
    (4 * 1024 * 1024, 1024 * 1024, 0x33),  # several batches
    (8 * 1024 * 1024, 131072, 0),  # zeroed
    (16 * 1024 * 1024 - 4096, 4096, 0x44),  # the last block
]


def write_cmds(fua: bool = False) -> list[str]:
    f = "-f " if fua else ""
    return [f"write {f}-P {p} {o} {n}" if p else f"write {f}-z {o} {n}" for o, n, p in WRITES]


def read_cmds() -> list[str]:
    return [f"read -P {p} {o} {n}" for o, n, p in WRITES]


def base_bytes(base: Path, offset: int, length: int) -> bytes:
    with open(base, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_session_moves_to_another_node_with_all_its_writes(system, base_image: Path) -> None:  # type: ignore[no-untyped-def]
    s = system()
    await s.start_cache()
    ex = export("mv", base_image)
    node_a, uri_a = await s.start_node(ex, "a")
    await asyncio.to_thread(qemu_io, f"{uri_a}/mv", *write_cmds())
    node_a.kill9()  # no goodbye: whatever A held in memory is gone
    _node_b, uri_b = await s.start_node(ex, "b")
    await asyncio.to_thread(qemu_io, f"{uri_b}/mv", *read_cmds())
    # Bytes around the unaligned write still come from the base image.
    out = await asyncio.to_thread(qemu_io, f"{uri_b}/mv", "read -v 999990 10")
    assert base_bytes(base_image, 999990, 10).hex()[:4] in out.replace(" ", "")
    stats = await s.stats()
    (wc,) = [w for w in stats["write_caches"] if w["session_id"] == "session-mv"]
    assert wc["used"] >= 65536 + 1024 * 1024 + 8192 + 4096
    assert wc["zeroed"] == 131072


async def test_a_node_drops_its_session_when_another_node_attaches_it(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    """Node A keeps the session after its client left (linger); the client writes through
    node B, then comes back to A: A must not answer from its old mirror."""
    s = system()
    await s.start_cache()
    ex = export("back", base_image)
    _node_a, uri_a = await s.start_node(ex, "a")
    _node_b, uri_b = await s.start_node(ex, "b")
    await asyncio.to_thread(qemu_io, f"{uri_a}/back", "write -P 0x11 0 65536")
    # A second client stays connected to A meanwhile: its connection is ended too.
    held = RawNbd(int(uri_a.rsplit(":", 1)[1]))
    held.go("back")
    assert held.read(0, 4096) == b"\x11" * 4096
    await asyncio.to_thread(
        qemu_io, f"{uri_b}/back", "read -P 0x11 0 65536", "write -P 0x55 0 4096"
    )
    assert await asyncio.to_thread(held.closed_by_peer)
    held.close()
    # Back on A: the session opens again there and pulls what B wrote.
    await asyncio.to_thread(
        qemu_io, f"{uri_a}/back", "read -P 0x55 0 4096", "read -P 0x11 4096 61440"
    )
    log = (s.root / "a.log").read_text()
    assert "session session-back: its write cache session-back was attached by stream node" in log
    assert "(1 connection(s) ended)" in log


async def test_a_node_cut_off_from_nats_drops_its_unused_sessions(
    tmp_path: Path, base_image: Path
) -> None:
    """A takeover notice sent while a node is cut off from NATS is lost to it: after the
    reconnection the node drops the sessions no client is connected to."""
    nats_server = await start_nats(tmp_path / "nats", tmp_path / "nats.log")
    s = System(nats_server, tmp_path / "sys", {})
    s.root.mkdir()
    try:
        await s.start_cache()
        _node, uri = await s.start_node(export("cut", base_image), "a")
        await asyncio.to_thread(qemu_io, f"{uri}/cut", "write -P 0x51 0 64k")  # then lingers
        await nats_server.stop()
        await asyncio.sleep(1.0)
        await nats_server.start(log_path=tmp_path / "nats.log")
        log = s.root / "a.log"
        for _ in range(150):
            if "dropped after a NATS outage" in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert "session session-cut dropped after a NATS outage" in log.read_text()
        # The client's next connection opens the session again, with its write.
        for _ in range(50):  # until the cache service is back on NATS too
            out = await asyncio.to_thread(
                qemu_io, f"{uri}/cut", "read -P 0x51 0 64k", expect_error=True
            )
            if "read 65536/65536" in out and "failed" not in out:
                break
            await asyncio.sleep(0.2)
        assert "read 65536/65536" in out and "failed" not in out, out
    finally:
        s.stop()
        await nats_server.stop()


async def test_fua_and_flushed_writes_survive_kill9_of_the_cache_service(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    cache = await s.start_cache()
    ex = export("dur", base_image, write_cache="server-ram")
    node_a, uri_a = await s.start_node(ex, "a")
    # Half with FUA, half followed by an acknowledged flush.
    cmds = write_cmds(fua=True)
    await asyncio.to_thread(qemu_io, f"{uri_a}/dur", *cmds[:3])
    await asyncio.to_thread(qemu_io, f"{uri_a}/dur", *write_cmds()[3:], "flush")
    cache.kill9()
    node_a.kill9()
    await s.start_cache()  # recovers the caches it finds
    _node_b, uri_b = await s.start_node(ex, "b")
    await asyncio.to_thread(qemu_io, f"{uri_b}/dur", *read_cmds())


async def test_full_write_cache_answers_enospc_and_keeps_what_it_acknowledged(
    system, base_image: Path, nats_url: str, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    import json

    import nats

    s = system(cache_write_capacity=str(1024 * 1024))
    await s.start_registry(database_url)  # WriteCacheFull goes into the log, then the bus
    full_events: list[dict] = []

    async def on_full(msg) -> None:  # type: ignore[no-untyped-def]
        full_events.append(json.loads(msg.data)["data"])

    nc = await nats.connect(nats_url)
    await nc.subscribe("events.WriteCacheFull.>", cb=on_full)
    await s.start_cache()
    ex = export("full", base_image)
    _node, uri = await s.start_node(ex, "a")
    await asyncio.to_thread(qemu_io, f"{uri}/full", "write -P 0x55 0 512k")
    out = await asyncio.to_thread(qemu_io, f"{uri}/full", "write -P 0x66 2M 1M", expect_error=True)
    assert "No space left on device" in out, out
    await asyncio.to_thread(qemu_io, f"{uri}/full", "read -P 0x55 0 512k")
    # A write beyond the end of the disk: refused before any cache sees it.
    port = int(uri.rsplit(":", 1)[1])

    def write_past_end() -> int:
        c = RawNbd(port)
        c.go("full")
        err = c.write(IMAGE_SIZE - 2048, b"x" * 4096)
        c.close()
        return err

    assert await asyncio.to_thread(write_past_end) == errno.ENOSPC
    # Rewriting blocks it already holds needs no room.
    await asyncio.to_thread(qemu_io, f"{uri}/full", "write -P 0x77 0 512k", "read -P 0x77 0 512k")
    log = (s.root / "cache.log").read_text()
    assert "write cache session-full full" in log
    for _ in range(100):
        if full_events:
            break
        await asyncio.sleep(0.1)
    assert full_events == [
        {"session_id": "session-full", "capacity": 1024 * 1024, "used": 1024 * 1024}
    ]
    await nc.close()


async def test_write_to_a_dropped_cache_is_a_clear_error(
    system, base_image: Path, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    s = system()
    await s.start_cache()
    ex = export("drop", base_image)
    _node, uri = await s.start_node(ex, "a")
    await asyncio.to_thread(qemu_io, f"{uri}/drop", "write -P 0x12 0 64k")
    # The registry closes the session: the cache service drops the session's cache.
    await s.close_session(database_url, "session-drop")
    for _ in range(100):
        if not (await s.stats())["write_caches"]:
            break
        await asyncio.sleep(0.05)
    # This node still has the session open (it did not get the event): writes now fail.
    out = await asyncio.to_thread(qemu_io, f"{uri}/drop", "write -P 0x13 0 4k", expect_error=True)
    assert "Input/output error" in out, out
    assert "was dropped" in (s.root / "a.log").read_text()


async def test_kept_write_cache_outlives_the_session(
    system, base_image: Path, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Persistence ``keep``: the device's next session of the same version finds its writes,
    even after the first session was closed; a ``discard`` session's cache is gone."""
    s = system()
    await s.start_cache()
    kept = {"write_cache_persistence": "keep", "mac": "52:54:00:aa:bb:cc"}
    ex = {
        **export("k1", base_image, session_id="s-k1", **kept),
        **export("k2", base_image, session_id="s-k2", **kept),
    }
    _node, uri = await s.start_node(ex, "a")
    await asyncio.to_thread(qemu_io, f"{uri}/k1", "write -P 0x61 0 64k", "flush")
    await s.close_session(database_url, "s-k1")
    await asyncio.to_thread(qemu_io, f"{uri}/k2", "read -P 0x61 0 64k")
    (wc,) = (await s.stats())["write_caches"]
    assert wc["key"] == "device-525400aabbcc-golden-v1" and wc["session_id"] == "s-k2"


async def test_sessions_of_a_huge_disk_cost_memory_for_their_writes_only(
    system, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A write cache's block map is one state byte per 4 KiB block: for a 1 TiB vdisk,
    256 MiB per session if it were allocated whole, in the stream node and again in the
    cache service. Four sessions write at both ends of the disk, move to another node
    and read back: both processes grow by far less than one such map."""
    size = 1 << 40
    huge = tmp_path / "huge.raw"
    huge.touch()
    os.truncate(huge, size)  # sparse: reads as zeros
    s = system()
    cache = await s.start_cache()
    tokens = [f"huge{i}" for i in range(4)]
    exports = {t: export(t, huge, size=size)[t] for t in tokens}
    node_a, uri_a = await s.start_node(exports, "a")
    procs = {"cache": cache.p.pid, "node": node_a.p.pid}
    before = {k: rss_mib(pid) for k, pid in procs.items()}
    end = size - 65536
    for i, t in enumerate(tokens):
        await asyncio.to_thread(
            qemu_io, f"{uri_a}/{t}", f"write -P {0x61 + i} 0 64k", f"write -P {0x71 + i} {end} 64k"
        )
    grown = {k: rss_mib(pid) - before[k] for k, pid in procs.items()}
    assert all(g < 64 for g in grown.values()), grown
    node_a.kill9()
    _node_b, uri_b = await s.start_node(exports, "b")
    for i, t in enumerate(tokens):
        await asyncio.to_thread(
            qemu_io,
            f"{uri_b}/{t}",
            f"read -P {0x61 + i} 0 64k",
            "read -P 0 64k 64k",
            f"read -P {0x71 + i} {end} 64k",
        )
    stats = await s.stats()
    used = {w["session_id"]: w["used"] for w in stats["write_caches"]}
    assert all(used[f"session-{t}"] == 2 * 65536 for t in tokens), used
    assert rss_mib(cache.p.pid) - before["cache"] < 64


def files_held(pid: int, directory: Path) -> int:
    """Descriptors of process ``pid`` open on files in ``directory``."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += Path(os.readlink(fd)).parent == directory
        except OSError:
            continue  # closed meanwhile
    return n


async def held_settles(pid: int, directory: Path, want: int) -> None:
    for _ in range(300):
        if files_held(pid, directory) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the cache service holds {files_held(pid, directory)} files, not {want}")


async def test_idle_write_caches_hold_no_descriptors_in_the_cache_service(  # type: ignore[no-untyped-def]
    system, base_image: Path
) -> None:
    """Sessions written to and flushed, then idle for CACHE_WRITE_IDLE_CLOSE_S: the cache
    service closes their files; a node that attaches one later reads its blocks back
    through the cache service (which opens them again, then closes them again)."""
    s = system(cache_write_idle_close_s="1")
    cache = await s.start_cache()
    ex = {**export("idle1", base_image), **export("idle2", base_image)}
    _node_a, uri_a = await s.start_node(ex, "a")
    for token in ex:
        await asyncio.to_thread(qemu_io, f"{uri_a}/{token}", "write -P 0x5a 0 65536", "flush")
    write_dir = s.data / "cache" / "write"
    assert len(list(write_dir.glob("*.data"))) == 2
    await held_settles(cache.p.pid, write_dir, 0)
    _node_b, uri_b = await s.start_node(ex, "b")  # an empty mirror: reads go to the cache
    await asyncio.to_thread(qemu_io, f"{uri_b}/idle1", "read -P 0x5a 0 65536")
    await held_settles(cache.p.pid, write_dir, 0)
