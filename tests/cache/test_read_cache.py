"""The shared read cache over real stores: an FTP share (aioftp's own server, with an
artificial delay per transfer), a block device (a file stands in), boot profiles and the
prefetch on BootRequested; reads by a real NBD client through stream nodes."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest

from shared import nbd_wire as W
from shared.events import CATALOG, envelope
from shared.vdisk_layout import write_delta
from streamboot.embedded.proc import free_port
from tests.cache.conftest import IMAGE_SIZE, export, qemu_io
from tests.cache.ftpd import SlowFtpServer, ftp_server
from tests.cache.ftpd import url as ftp_url
from tests.stream.nbdraw import RawNbd

DELAY_S = 0.02  # per FTP transfer: a slow store


@asynccontextmanager
async def ftp(root: Path, delay_s: float) -> AsyncIterator[tuple[SlowFtpServer, str]]:
    port = free_port()
    async with ftp_server(root, port, delay_s) as server:
        yield server, ftp_url(port)


@pytest.fixture(scope="module")
def vdisk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base.raw + a v2 delta in the vdisk's folder of a store, and v2's full image."""
    root = tmp_path_factory.mktemp("store")
    d = root / "golden"
    d.mkdir()
    rnd = random.Random(5)
    base = bytearray(rnd.randbytes(IMAGE_SIZE))
    base[12 << 20 : 13 << 20] = bytes(1 << 20)  # a zero MiB (a hole in the cache file)
    (d / "base.raw").write_bytes(base)
    v2 = bytearray(base)
    v2[3 << 20 : (3 << 20) + 200_000] = rnd.randbytes(200_000)
    full = root / "v2-full.raw"
    full.write_bytes(v2)
    assert write_delta([d / "base.raw"], full, d / "v2") > 0
    return {"dir": root, "full": full}


def version2(token: str, folder: Path = Path(), **kw: object) -> dict[str, dict[str, object]]:
    """The export of the fixture's version 2 (base + delta) under ``folder`` of a store."""
    layers = [str(folder / "golden" / "base.raw"), str(folder / "golden" / "v2.map")]
    return export(token, folder / "golden" / "base.raw", version=2, layers=layers, **kw)


def boot_trace(seed: int = 1) -> list[tuple[int, int]]:
    """A boot-like read pattern: mostly sequential runs with jumps, 4 KiB to 128 KiB reads."""
    rnd = random.Random(seed)
    out, pos = [], 0
    for _ in range(300):
        if rnd.random() < 0.2:
            pos = rnd.randrange(0, IMAGE_SIZE - (1 << 20)) // 4096 * 4096
        n = rnd.choice([4096, 16384, 65536, 131072])
        if pos + n > IMAGE_SIZE:
            pos = 0
        out.append((pos, n))
        pos += n
    return out


def unique_bytes(trace: list[tuple[int, int]]) -> int:
    return 4096 * len({b for o, n in trace for b in range(o // 4096, (o + n - 1) // 4096 + 1)})


def replay(uri: str, token: str, trace: list[tuple[int, int]], expect: bytes) -> int:
    """Read the trace over one NBD connection; every byte must be the version's."""
    port = int(uri.rsplit(":", 1)[1])
    c = RawNbd(port, timeout=30)
    c.go(token)
    total = 0
    for off, n in trace:
        got = c.read(off, n)
        assert got == expect[off : off + n], f"wrong data at {off}+{n}"
        total += n
    c.close()
    return total


def forget_the_page_cache(data: Path) -> None:
    """What a machine restart without a clean stop does to a cache service's read caches:
    their files were written on another boot (read_cache.VersionCache)."""
    for state in data.glob("cache/read/*/state.json"):
        state.write_text(json.dumps({**json.loads(state.read_text()), "boot_id": "earlier"}))


async def publish(nats_url: str, typ: str, kind: str, data: dict[str, object]) -> None:
    """An event as the registry's relay publishes it (for events of services not run here)."""
    env = envelope(CATALOG[typ].model_validate(data))
    nc = await nats.connect(nats_url)
    await nc.publish(f"events.{typ}.{kind}", env.model_dump_json().encode())
    await nc.flush()
    await nc.close()


async def wait_for(cond, what: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.1)):
        got = await cond()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_second_boot_from_a_slow_ftp_store_reads_its_boot_from_the_cache(  # type: ignore[no-untyped-def]
    system, vdisk, nats_url: str, database_url: str
) -> None:
    expect = vdisk["full"].read_bytes()
    trace = boot_trace()
    async with ftp(vdisk["dir"], DELAY_S) as (ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}), boot_profile_window_s="120")
        await s.start_registry(database_url)
        cache = await s.start_cache()
        ex = {
            **version2("b1", store="ftp", session_id="s-boot1"),
            **version2("b2", store="ftp", session_id="s-boot2"),
        }
        node_a, uri_a = await s.start_node(ex, "a", "--publish-events")

        # First boot: every block from the store, through the cache; learnt as the profile.
        nc = await nats.connect(nats_url)
        updates: list[dict] = []
        prefetched: list[dict] = []

        def collect(into: list[dict]):  # type: ignore[no-untyped-def]
            async def cb(m) -> None:  # type: ignore[no-untyped-def]
                into.append(json.loads(m.data)["data"])

            return cb

        await nc.subscribe("events.BootProfileUpdated.>", cb=collect(updates))
        await nc.subscribe("events.PrefetchCompleted.>", cb=collect(prefetched))
        boot_bytes = await asyncio.to_thread(replay, uri_a, "b1", trace, expect)
        first = await s.stats()
        assert first["read_cache"]["store_bytes"] >= boot_bytes * 0.5
        await asyncio.sleep(1.5)  # the node's BlocksRequested batch (every second)
        await publish(
            nats_url, "SessionClosed", "session", {"session_id": "s-boot1", "reason": "t"}
        )

        async def profiled():  # type: ignore[no-untyped-def]
            return updates and updates[-1]

        update = await wait_for(profiled, "BootProfileUpdated (through the registry's log)")
        assert update["vdisk"] == "golden" and update["version"] == 2 and update["boots_seen"] == 1
        assert update["bytes"] >= unique_bytes(trace)

        # The cache service's machine restarts (no clean stop): its read cache is cold
        # again. A new node, a new session.
        cache.kill9()
        node_a.stop()
        forget_the_page_cache(s.data)
        await s.start_cache()
        retrs_before = ftpd.retrs
        await publish(
            nats_url,
            "BootRequested",
            "boot",
            {"mac": "52:54:00:00:00:01", "vdisk": "golden", "version": 2},
        )

        async def prefetch_done():  # type: ignore[no-untyped-def]
            return prefetched and prefetched[-1]

        done = await wait_for(prefetch_done, "PrefetchCompleted")
        assert done["bytes"] >= update["bytes"] * 0.9 and done["duration_ms"] > 0
        assert ftpd.retrs > retrs_before
        before = (await s.stats())["read_cache"]
        _node_b, uri_b = await s.start_node(ex, "b", "--publish-events")
        assert await asyncio.to_thread(replay, uri_b, "b2", trace, expect) == boot_bytes
        after = (await s.stats())["read_cache"]
        from_store = after["store_bytes"] - before["store_bytes"]
        # >= 90 % of the second boot's bytes came from the cache, not the store.
        assert from_store <= 0.1 * boot_bytes, (from_store, boot_bytes)
        assert after["hit_ratio"] is not None
        await nc.close()


async def test_block_device_store_and_bounded_read_cache(system, vdisk) -> None:  # type: ignore[no-untyped-def]
    expect = vdisk["full"].read_bytes()
    cap = 2 * 1024 * 1024
    san = f"blockdev://{vdisk['dir']}"
    s = system(cache_stores=json.dumps({"san": san}), cache_read_capacity=str(cap))
    await s.start_cache()
    _node, uri = await s.start_node(version2("bd", store="san"), "a")
    trace = [(o, 65536) for o in range(0, 8 << 20, 65536)]
    await asyncio.to_thread(replay, uri, "bd", trace, expect)
    rc = (await s.stats())["read_cache"]
    assert rc["used"] <= cap
    assert rc["evicted_bytes"] >= (8 << 20) - cap
    assert rc["store_bytes"] >= 8 << 20


async def test_ftp_store_gone_mid_read_is_an_error_not_wrong_data(system, vdisk) -> None:  # type: ignore[no-untyped-def]
    expect = vdisk["full"].read_bytes()
    async with ftp(vdisk["dir"], 0.0) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        await s.start_cache()
        _node, uri = await s.start_node(version2("gone", store="ftp"), "a")
        await asyncio.to_thread(replay, uri, "gone", [(0, 65536)], expect)
    # The FTP server has stopped: blocks already cached still read, others fail clearly.
    await asyncio.to_thread(replay, uri, "gone", [(0, 65536)], expect)
    port = int(uri.rsplit(":", 1)[1])

    def read_uncached() -> tuple[int, int]:
        c = RawNbd(port, timeout=60)
        c.go("gone")
        c.request(0, 7, 8 << 20, 4096)  # NBD_CMD_READ
        return c.reply()

    err, _handle = await asyncio.to_thread(read_uncached)
    assert err == 5  # EIO
    assert "cannot connect" in (s.root / "cache.log").read_text()


async def test_a_miss_does_not_hold_up_other_reads(system, vdisk) -> None:  # type: ignore[no-untyped-def]
    # A block the node does not have is fetched while the node answers everything else.
    expect = vdisk["full"].read_bytes()
    async with ftp(vdisk["dir"], 0.5) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        await s.start_cache()
        _node, uri = await s.start_node(version2("slow", store="ftp"), "a")
        await asyncio.to_thread(replay, uri, "slow", [(0, 65536)], expect)  # now on the node
        port = int(uri.rsplit(":", 1)[1])

        def pipelined() -> list[int]:
            c = RawNbd(port, timeout=60)
            c.go("slow")
            c.request(W.CMD_READ, 1, 8 << 20, 4096)  # a miss: from the slow store
            c.request(W.CMD_READ, 2, 0, 4096)  # on the node already
            order = []
            for _ in range(2):
                err, handle = c.reply()
                offset = 8 << 20 if handle == 1 else 0
                assert err == 0 and c.recv_exact(4096) == expect[offset : offset + 4096]
                order.append(handle)
            c.close()
            return order

        # The second request is answered first: the first one's fetch did not block the loop.
        assert await asyncio.to_thread(pipelined) == [2, 1]


async def test_local_store_boot_profile_is_prefetched_on_boot_requested(  # type: ignore[no-untyped-def]
    system, vdisk, nats_url: str, database_url: str
) -> None:
    """A local vdisk: reads never touch the bus, but the session tells the cache service the
    version is served, its boot is learnt (ended by ClientBooted), and BootRequested warms
    it (PrefetchCompleted)."""
    expect = vdisk["full"].read_bytes()
    trace = boot_trace(seed=2)
    s = system(vdisk_dir=str(vdisk["dir"]))
    await s.start_registry(database_url)
    await s.start_cache()
    ex = version2("l1", vdisk["dir"], session_id="s-local1")
    _node, uri = await s.start_node(ex, "a", "--publish-events")
    nc = await nats.connect(nats_url)
    got: dict[str, list[dict]] = {"BootProfileUpdated": [], "PrefetchCompleted": []}

    async def on_event(m) -> None:  # type: ignore[no-untyped-def]
        env = json.loads(m.data)
        got[env["type"]].append(env["data"])

    await nc.subscribe("events.BootProfileUpdated.>", cb=on_event)
    await nc.subscribe("events.PrefetchCompleted.>", cb=on_event)
    await asyncio.to_thread(replay, uri, "l1", trace, expect)
    assert (await s.stats())["read_cache"]["store_bytes"] == 0  # off the bus
    # The client says it has booted (the boot service's ClientBooted): the boot ends.
    await publish(nats_url, "ClientBooted", "session", {"session_id": "s-local1", "mac": "m"})

    async def profiled():  # type: ignore[no-untyped-def]
        return got["BootProfileUpdated"]

    await wait_for(profiled, "BootProfileUpdated")
    # The boot service's event, without a version: the newest version served is warmed.
    await publish(
        nats_url, "BootRequested", "boot", {"mac": "52:54:00:00:00:02", "vdisk": "golden"}
    )

    async def prefetched():  # type: ignore[no-untyped-def]
        return got["PrefetchCompleted"]

    (done,) = await wait_for(prefetched, "PrefetchCompleted")
    assert done["version"] == 2 and done["bytes"] >= unique_bytes(trace)
    await nc.close()


async def test_a_read_waits_for_a_restarting_cache_service(system, vdisk) -> None:  # type: ignore[no-untyped-def]
    # A block of a remote store not yet on the node, asked while no cache node answers: the
    # read waits (stream_cache_outage_grace_s) and gets the right bytes once one is back.
    expect = vdisk["full"].read_bytes()
    async with ftp(vdisk["dir"], 0.0) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        cache = await s.start_cache()
        _node, uri = await s.start_node(version2("waitrd", store="ftp"), "a")
        await asyncio.to_thread(replay, uri, "waitrd", [(0, 65536)], expect)
        cache.kill9()
        reading = asyncio.create_task(
            asyncio.to_thread(replay, uri, "waitrd", [(8 << 20, 65536)], expect)
        )
        log = s.root / "a.log"
        waiting = "asking again for up to 30 s"
        await wait_for(lambda: asyncio.to_thread(lambda: waiting in log.read_text()), "the wait")
        assert not reading.done()
        await s.start_cache()
        assert await asyncio.wait_for(reading, 30) == 65536  # replay checks every byte
        assert "from the cache service: answered after" in await asyncio.to_thread(log.read_text)


async def test_a_session_of_a_remote_store_opened_while_the_cache_service_restarts(
    system, vdisk
) -> None:  # type: ignore[no-untyped-def]
    # The session's open (rc.open for its read cache, wc.open for its write cache) waits for
    # the cache service instead of refusing the client's connection.
    expect = vdisk["full"].read_bytes()
    async with ftp(vdisk["dir"], 0.0) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        cache = await s.start_cache()
        _node, uri = await s.start_node(version2("waitopen", store="ftp"), "a")
        cache.kill9()
        reading = asyncio.create_task(
            asyncio.to_thread(replay, uri, "waitopen", [(0, 65536), (8 << 20, 65536)], expect)
        )
        log = s.root / "a.log"
        waiting = "open of the read cache of ftp:"
        await wait_for(lambda: asyncio.to_thread(lambda: waiting in log.read_text()), "the wait")
        assert not reading.done()
        await s.start_cache()
        assert await asyncio.wait_for(reading, 30) == 2 * 65536  # replay checks every byte
        text = await asyncio.to_thread(log.read_text)
        assert "open of the read cache of ftp:" in text and "answered after" in text


@pytest.mark.parametrize("how", ["stopped", "killed", "machine-restarted"])
async def test_a_restarted_cache_service_finds_its_read_cache_warm(  # type: ignore[no-untyped-def]
    system, vdisk, how: str
) -> None:
    """An upgrade (stop, start) or a crash (kill -9) of the cache service does not send the
    next boots back to the slow store; a machine restart without a clean stop does (its
    page cache, which held some of the cache's blocks, is gone), and still reads right."""
    expect = vdisk["full"].read_bytes()
    trace = [(0, 1 << 20), (3 << 20, 256 << 10), (12 << 20, 512 << 10)]  # a zero MiB too
    wanted = sum(n for _o, n in trace)
    async with ftp(vdisk["dir"], 0.0) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        cache = await s.start_cache()
        first, second = f"rk1-{how}", f"rk2-{how}"  # session keys are unique across the run
        ex = {**version2(first, store="ftp"), **version2(second, store="ftp")}
        _node_a, uri_a = await s.start_node(ex, "a")
        assert await asyncio.to_thread(replay, uri_a, first, trace, expect) == wanted
        assert (await s.stats())["read_cache"]["store_bytes"] >= wanted
        if how == "stopped":
            cache.stop()
        else:
            cache.kill9()
        if how == "machine-restarted":
            assert list(s.data.glob("cache/read/*/state.json"))
            forget_the_page_cache(s.data)
        await s.start_cache()
        # Another stream node: its mirror is empty, every block comes from the cache service.
        _node_b, uri_b = await s.start_node(ex, "b")
        assert await asyncio.to_thread(replay, uri_b, second, trace, expect) == wanted
        stats = (await s.stats())["read_cache"]
        if how == "machine-restarted":
            assert stats["store_bytes"] >= wanted, stats
            assert "; 0 bytes kept from before" in s.cache_log().read_text()
        else:
            assert stats["store_bytes"] == 0 and stats["hit_bytes"] >= wanted, stats
            assert f"{wanted} bytes kept from before" in s.cache_log().read_text()


@pytest.mark.parametrize("after", ["quiet", "changed"])
async def test_a_checkpoint_keeps_the_read_cache_across_a_machine_restart(  # type: ignore[no-untyped-def]
    system, vdisk, after: str
) -> None:
    """A read cache quiet for CACHE_READ_CHECKPOINT_S is fsynced and marked durable: the
    cache service killed and the machine restarted (its page cache gone), the next boot
    reads from the cache, not the store. Filled again after the checkpoint and then lost
    the same way, it starts empty: the mark is withdrawn before the files change."""
    expect = vdisk["full"].read_bytes()
    trace = [(0, 1 << 20), (3 << 20, 256 << 10), (12 << 20, 512 << 10)]
    wanted = sum(n for _o, n in trace)
    async with ftp(vdisk["dir"], 0.0) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}), cache_read_checkpoint_s="2")
        cache = await s.start_cache()
        first, second = f"ck1-{after}", f"ck2-{after}"
        ex = {**version2(first, store="ftp"), **version2(second, store="ftp")}
        _node_a, uri_a = await s.start_node(ex, "a")
        assert await asyncio.to_thread(replay, uri_a, first, trace, expect) == wanted

        async def checkpointed() -> bool:
            return "checkpointed" in await asyncio.to_thread(s.cache_log().read_text)

        await wait_for(checkpointed, "a checkpoint of the read cache")
        (state,) = s.data.glob("cache/read/*/state.json")
        assert json.loads(state.read_text()).get("clean") is True
        if after == "changed":
            more = [(8 << 20, 256 << 10)]  # not cached yet: a fill after the checkpoint
            assert await asyncio.to_thread(replay, uri_a, first, more, expect) == 256 << 10
            assert "clean" not in json.loads(state.read_text())
        cache.kill9()
        forget_the_page_cache(s.data)
        await s.start_cache()
        _node_b, uri_b = await s.start_node(ex, "b")  # an empty mirror: all from the cache
        assert await asyncio.to_thread(replay, uri_b, second, trace, expect) == wanted
        stats = (await s.stats())["read_cache"]
        log_text = s.cache_log().read_text()
        if after == "quiet":
            assert stats["store_bytes"] == 0 and stats["hit_bytes"] >= wanted, stats
            assert f"{wanted} bytes kept from before" in log_text
        else:
            assert stats["store_bytes"] >= wanted, stats
            assert "; 0 bytes kept from before" in log_text


async def test_two_sector_writes_into_one_block_of_a_fetched_vdisk_both_land(system, vdisk) -> None:  # type: ignore[no-untyped-def]
    # Both 512-byte writes are partial writes of one 4 KiB block that is not on the node
    # yet: each copies the block from the store first, and they are in flight together.
    expect = vdisk["full"].read_bytes()
    at = 5 << 20
    async with ftp(vdisk["dir"], 0.2) as (_ftpd, url):
        s = system(cache_stores=json.dumps({"ftp": url}))
        await s.start_cache()
        _node, uri = await s.start_node(version2("race", store="ftp"), "a")
        await asyncio.to_thread(
            qemu_io,
            f"{uri}/race",
            f"aio_write -P 0xaa {at} 512",
            f"aio_write -P 0xbb {at + 512} 512",
            "aio_flush",
            f"read -P 0xaa {at} 512",
            f"read -P 0xbb {at + 512} 512",
        )
        c = RawNbd(int(uri.rsplit(":", 1)[1]), timeout=30)
        c.go("race")
        assert c.read(at + 1024, 3072) == expect[at + 1024 : at + 4096]
        c.close()
