"""A cache node that goes away and comes back: the session's writes wait for it instead of
failing, and nothing they wrote is lost (remote_write_cache.py, "ride-out")."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from shared.contracts.cache import wire
from shared.contracts.cache.client import CacheClient
from tests.cache.conftest import Proc, System, export, qemu_io, run
from tests.cache.test_write_cache import read_cmds, write_cmds
from tests.conftest import wait_for
from tests.stream.nbdraw import RawNbd


def in_log(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text()


async def cache_and_node(
    s: System, base_image: Path, token: str, *node_args: str
) -> tuple[System, Proc, dict, Proc, str]:
    """A cache service and stream node "a" serving session ``token``."""
    cache = await s.start_cache()
    ex = export(token, base_image)
    node, uri = await s.start_node(ex, "a", *node_args)
    return s, cache, ex, node, uri


async def read_back_elsewhere(s: System, ex: dict, token: str, *cmds: str) -> None:
    """Kill -9 the cache service (what it acknowledged as flushed must be on its disk) and
    read the session back through a new stream node, which pulls it from the cache."""
    assert s.cache is not None
    s.cache.kill9()
    await s.start_cache()
    _node_b, uri_b = await s.start_node(ex, f"after-{token}")
    await asyncio.to_thread(qemu_io, f"{uri_b}/{token}", *cmds)


async def test_writes_wait_for_a_restarting_cache_node_and_are_all_kept(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    s, cache, ex, node_a, uri = await cache_and_node(system(), base_image, "ride-rs")
    await asyncio.to_thread(qemu_io, f"{uri}/ride-rs", *write_cmds()[:2], "flush")
    cache.kill9()
    # A client writes while no cache node answers: the writes and the flush wait...
    during = [*write_cmds()[2:], "write -P 0x66 12M 64k", "flush"]
    client = asyncio.create_task(asyncio.to_thread(qemu_io, f"{uri}/ride-rs", *during))
    await wait_for(
        in_log(s.root / "a.log", "holding the session's writes"), "holding the session's writes", 20
    )
    await asyncio.sleep(0.5)
    assert not client.done()
    # ...until the node is back (same node id and disk: it recovers its caches).
    await s.start_cache()
    await asyncio.wait_for(client, 30)  # qemu_io asserts no error
    await wait_for(in_log(s.root / "a.log", "answers again after"), "answers again after", 20)
    node_a.kill9()
    await read_back_elsewhere(s, ex, "ride-rs", *read_cmds(), "read -P 0x66 12M 64k")


async def test_a_batch_lost_with_the_cache_node_is_sent_again(system, base_image: Path) -> None:  # type: ignore[no-untyped-def]
    """The write reaches the cache process, which dies before applying it: only the stream
    node's mirror has it, and it goes out again once the node answers."""
    s, cache, ex, node_a, uri = await cache_and_node(
        system(), base_image, "ride-lost", "--cache-timeout", "1"
    )
    await asyncio.to_thread(qemu_io, f"{uri}/ride-lost", "write -P 0x21 0 64k", "flush")
    cache.p.send_signal(signal.SIGSTOP)  # takes the batch off the bus, never answers
    client = asyncio.create_task(
        asyncio.to_thread(qemu_io, f"{uri}/ride-lost", "write -P 0x22 1M 128k", "flush")
    )
    await asyncio.sleep(0.5)
    cache.kill9()
    await wait_for(
        in_log(s.root / "a.log", "holding the session's writes"), "holding the session's writes", 20
    )
    await s.start_cache()
    await asyncio.wait_for(client, 30)
    await wait_for(in_log(s.root / "a.log", "sent again the"), "sent again the", 20)
    node_a.kill9()
    await read_back_elsewhere(s, ex, "ride-lost", "read -P 0x21 0 64k", "read -P 0x22 1M 128k")


async def test_a_session_opened_while_the_cache_node_restarts_waits_for_it(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    """A client that boots while the cache service restarts: its session's open (wc.open)
    waits for the service instead of refusing the client's connection."""
    s, cache, ex, node_a, uri = await cache_and_node(system(), base_image, "ride-open")
    cache.kill9()
    cmds = ["write -P 0x41 0 64k", "read -P 0x41 0 64k", "flush"]
    client = asyncio.create_task(asyncio.to_thread(qemu_io, f"{uri}/ride-open", *cmds))
    log = s.root / "a.log"
    waiting = "open of write cache session-ride-open: cache service not running"
    await wait_for(in_log(log, waiting), "the open waiting", 20)
    await asyncio.sleep(0.5)
    assert not client.done()
    await s.start_cache()
    await asyncio.wait_for(client, 30)  # qemu_io asserts no error
    assert "open of write cache session-ride-open: answered after" in log.read_text()
    node_a.kill9()
    await read_back_elsewhere(s, ex, "ride-open", "read -P 0x41 0 64k")


def lose_unfsynced(cache_files: Path, offset: int, length: int) -> None:
    """What a machine restart under a killed cache node takes of a write it acknowledged
    but never fsynced: the page cache of its data and of its map (clean again)."""
    with open(f"{cache_files}.data", "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))
    with open(f"{cache_files}.map", "r+b") as f:  # one state byte per 4 KiB block
        f.seek(offset // 4096)
        f.write(bytes(length // 4096))


async def test_writes_a_restarted_cache_machine_lost_are_sent_again(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    """No request fails here: the stream node learns of the restart from the next answer
    (a new incarnation of the node) and sends again what changed since the last flush."""
    s, cache, ex, node_a, uri = await cache_and_node(system(), base_image, "ride-crash")
    await asyncio.to_thread(qemu_io, f"{uri}/ride-crash", "write -P 0x51 0 64k", "flush")

    def write_unflushed() -> None:  # qemu-io would flush when it closes the disk
        c = RawNbd(int(uri.rsplit(":", 1)[1]))
        c.go("ride-crash")
        assert c.write(1 << 20, b"\x52" * 65536) == 0
        c.close()

    # Acknowledged, not flushed: the cache holds it in its page cache only.
    await asyncio.to_thread(write_unflushed)
    cache.kill9()
    await asyncio.to_thread(
        lose_unfsynced, s.data / "cache" / "write" / "session-ride-crash", 1 << 20, 65536
    )
    await s.start_cache()
    await asyncio.to_thread(qemu_io, f"{uri}/ride-crash", "write -P 0x53 2M 64k", "flush")
    log = s.root / "a.log"
    await wait_for(in_log(log, "restarted; sending again"), "the restart noticed", 20)
    await wait_for(in_log(log, "sent again the"), "the lost write sent again", 20)
    node_a.kill9()
    await read_back_elsewhere(
        s, ex, "ride-crash", "read -P 0x51 0 64k", "read -P 0x52 1M 64k", "read -P 0x53 2M 64k"
    )


async def test_a_cache_node_gone_past_the_grace_fails_the_writes_clearly(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    s, cache, _ex, _node, uri = await cache_and_node(
        system(), base_image, "ride-gone", "--outage-grace", "1.5"
    )
    await asyncio.to_thread(qemu_io, f"{uri}/ride-gone", "write -P 0x31 0 64k")
    cache.kill9()
    out: subprocess.CompletedProcess[str] = await asyncio.to_thread(
        run, "qemu-io", "-f", "raw", "-c", "write -P 0x32 0 4k", f"{uri}/ride-gone", check=False
    )
    assert "Input/output error" in out.stdout + out.stderr, out
    log = (s.root / "a.log").read_text()
    assert "retrying for up to 1.5 s" in log
    assert "holding write cache session-ride-gone is not alive for 1." in log
    assert "its writes fail with EIO" in log


async def test_a_stream_process_the_session_moved_away_from_cannot_write_over_it(
    system, nats_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Fencing: once process B attached the cache, the batches of A (say, sending its
    unflushed blocks again after an outage) are refused, so B's writes stay."""
    s = system()
    await s.start_cache()
    nc = await nats.connect(nats_url)
    try:
        client = CacheClient(nc)
        key = f"fence-{uuid.uuid4().hex[:8]}"
        body = {"key": key, "session_id": key, "vdisk": "golden", "version": 1,
                "size": 1 << 20, "kind": "server-disk", "persistence": "discard"}  # fmt: skip
        opened_a = await client.open_write_cache({**body, "stream_instance": "process-a"})
        a = client.writer(key, opened_a.node, "process-a")
        await a.submit(wire.OP_WRITE, 0, 4096, b"a" * 4096)
        opened_b = await client.open_write_cache({**body, "stream_instance": "process-b"})
        b = client.writer(key, opened_b.node, "process-b")
        await b.submit(wire.OP_WRITE, 0, 4096, b"b" * 4096)
        with pytest.raises(OSError, match="attached by another stream process"):
            await a.submit(wire.OP_WRITE, 0, 4096, b"A" * 4096)
        with pytest.raises(OSError, match="attached by another stream process"):
            await a.submit(wire.OP_FLUSH, 0, 0, None, True)
        assert await client.read_write_cache(opened_b.node, key, 0, 4096) == b"b" * 4096
        await b.submit(wire.OP_FLUSH, 0, 0, None, True)  # the attached one goes on
        assert "refused: attached by process-b" in s.cache_log().read_text()
    finally:
        await nc.close()


async def test_a_cache_node_restarted_before_a_new_cache_had_files_takes_its_first_writes(
    system, base_image: Path
) -> None:  # type: ignore[no-untyped-def]
    # A new cache's files are made once the opens pause (or by its first write): a cache
    # node killed before that comes back without the cache, while the stream node still
    # serves the session. Its writes then met "dropped by the cache service" (EIO); they
    # must open it again on the restarted node and land. Found by tests/model.
    s, cache, ex, node_a, uri = await cache_and_node(system(), base_image, "nofiles")
    await asyncio.to_thread(qemu_io, f"{uri}/nofiles", "read 0 4k")  # opened, not written
    cache.kill9()
    # What a kill before the files were made leaves: no files (this one was quick enough).
    for f in (s.data / "cache" / "write").glob("session-nofiles.*"):
        f.unlink()
    await s.start_cache()
    await asyncio.to_thread(qemu_io, f"{uri}/nofiles", *write_cmds(), "flush")
    node_a.kill9()
    await read_back_elsewhere(s, ex, "nofiles", *read_cmds())
