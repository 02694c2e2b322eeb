"""A stateful model test of a session's write path against an in-memory reference disk.

Two stacks, each over a real version chain (a base image and a delta, files in a tmp dir):

* ``local``: the in-process write cache (``server-disk``) over a bottom that must fetch each
  block before serving it (as a remote store does: the fetch yields to the event loop) over
  the chain's reader;
* ``remote``: the write cache held by the real cache service (a process on the session's
  nats-server) with its stream-side mirror, over the cached store (clean blocks through the
  cache service's read cache, which reads the chain from a ``blockdev://`` store).

Hypothesis drives sector-aligned writes (alone, FUA, or two at once into neighbouring
sectors), write-zeroes, trims, flushes, reads, a close and reopen of the session (for the
remote stack on another stream node, which pulls the session's blocks back), and for the
remote stack a ``kill -9`` of the cache service between two steps, with the session riding
it out or dying with it. Invariants: every read equals the reference; what a step
acknowledged is there after a crash (a killed process keeps what reached the kernel, and
a reply comes only after that); the chain's files never change.

``HYPOTHESIS_PROFILE=soak`` (``make soak``) runs it long; the default profile is short.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.stream.path.backend import Backend, BlocksMissing, ReadOnlyBottom, pread_via_map
from services.stream.path.cached_store import CachedStoreBackend, CacheLink
from services.stream.path.chain import ChainBackend
from services.stream.path.stack import attach_stack
from services.stream.path.stack import remote_write_stack as RemoteWriteCache
from services.stream.path.write_cache import WriteCache
from services.stream.spec import ExportSpec
from shared.block_map import BLOCK
from shared.contracts.cache.client import CacheClient
from shared.vdisk_layout import Piece, write_delta
from tests.cache.conftest import System
from tests.conftest import BusServer

SECTOR = 512
# Not a whole number of 4 KiB blocks (the last one is partial), and larger than the base
# image (its tail reads as zeros unless the delta holds it).
SIZE = 96 * BLOCK - 3 * SECTOR
BASE_SIZE = 80 * BLOCK + 1000
CHAIN_BLOCK = 16 * 1024
SECTORS = SIZE // SECTOR
MAX_SECTORS = 24  # a request: up to 12 KiB, so it spans 1-4 blocks


def make_chain(root: Path) -> bytes:
    """``root/golden/{base.raw, v2.map, v2.data}``; returns version 2's bytes."""
    d = root / "golden"
    d.mkdir(parents=True)
    rnd = random.Random(26)
    base = bytearray(rnd.randbytes(BASE_SIZE))
    base[8 * BLOCK : 12 * BLOCK] = bytes(4 * BLOCK)  # zeros in the base
    (d / "base.raw").write_bytes(base)
    v2 = bytearray(base[:SIZE]) + bytes(SIZE - len(base))
    for block in (1, 3, 4):  # delta blocks of 16 KiB: data, and one zeroed
        a = block * CHAIN_BLOCK
        v2[a : a + CHAIN_BLOCK] = rnd.randbytes(CHAIN_BLOCK) if block != 3 else bytes(CHAIN_BLOCK)
    v2[SIZE - 5000 :] = rnd.randbytes(5000)  # the tail past the base
    full = root / "v2-full.raw"
    full.write_bytes(v2)
    assert write_delta([d / "base.raw"], full, d / "v2", block_size=CHAIN_BLOCK) > 0
    full.unlink()
    return bytes(v2)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class FetchingChain(ReadOnlyBottom):
    """A chain whose blocks must be fetched onto this node before they are served: the
    fetch yields to the event loop, so concurrent requests interleave around it."""

    def __init__(self, layers: list[Path]) -> None:
        self.chain = ChainBackend(layers)
        self.size = self.chain.size
        self.present = bytearray(-(-self.size // BLOCK))

    def map_read(self, offset: int, length: int) -> list[Piece]:
        first, stop = offset // BLOCK, -(-(offset + length) // BLOCK)
        missing = [b for b in range(first, stop) if not self.present[b]]
        if missing:
            raise BlocksMissing(partial(self._fetch, missing))
        return self.chain.map_read(offset, length)

    async def _fetch(self, blocks: list[int]) -> None:
        for _ in range(3):  # a round trip
            await asyncio.sleep(0)
        for b in blocks:
            self.present[b] = 1

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.chain.extents(offset, length)

    def close(self) -> None:
        self.chain.close()


def request() -> st.SearchStrategy[tuple[int, int]]:
    """A sector-aligned ``(offset, length)`` inside the disk."""

    def clip(pair: tuple[int, int]) -> tuple[int, int]:
        first, n = pair
        return first * SECTOR, min(n, SECTORS - first) * SECTOR

    return st.tuples(st.integers(0, SECTORS - 1), st.integers(1, MAX_SECTORS)).map(clip)


OPS = st.sampled_from(["write", "zero", "trim"])


class World:
    """What outlives one example: the event loop, the chain, the cache service."""

    def __init__(self, root: Path, bus: BusServer | None) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.image = make_chain(root / "store")
        self.layers = [root / "store" / "golden" / "base.raw", root / "store" / "golden" / "v2.map"]
        self.golden = digest(root / "store" / "golden")
        # The stream side's bus connection: the stream role's user.
        self.nats_url = bus.url_for("stream") if bus is not None else None
        self.system: System | None = None
        self.nodes = 0
        if bus is not None:
            (root / "sys").mkdir()
            (root / "wc").mkdir()  # the stream side's mirrors of write caches
            stores = json.dumps({"san": f"blockdev://{root / 'store'}"})
            self.system = System(bus, root / "sys", {"STREAMBOOT_CACHE_STORES": stores})
            self.run(self.system.start_cache())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 120))

    def crash_cache(self) -> None:
        assert self.system is not None and self.system.cache is not None
        self.system.cache.kill9()
        self.run(self.system.start_cache())

    def close(self) -> None:
        if self.system is not None:
            self.system.stop()
        self.loop.close()


class WritePath(RuleBasedStateMachine):
    world: World  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.ref = bytearray(self.world.image)
        self.session = f"model-{uuid.uuid4().hex[:12]}"
        self.nc: nats.NATS | None = None
        self.stack: Backend = self.run(self.open())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.world.run(coro)

    @property
    def remote(self) -> bool:
        return self.world.system is not None

    async def open(self) -> Backend:
        """The session's stack on a new stream node (its own mirror and bus connection)."""
        w = self.world
        if not self.remote:
            return WriteCache(FetchingChain(w.layers), "server-disk", w.root)
        assert w.nats_url is not None
        w.nodes += 1
        self.nc = await nats.connect(w.nats_url)
        link = CacheLink(CacheClient(self.nc, timeout_s=5.0), w.root / f"mirror{w.nodes}")
        spec = ExportSpec(
            session_id=self.session,
            vdisk="golden",
            version=2,
            layers=tuple(Path("golden") / p.name for p in w.layers),
            size=SIZE,
            write_cache="server-disk",
            store="san",
        )
        wc = RemoteWriteCache(
            CachedStoreBackend(spec, link), spec, link, f"node{w.nodes}", w.root / "wc"
        )
        await attach_stack(wc)
        return wc

    async def close_stack(self) -> None:
        self.stack.close()
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

    async def read(self, offset: int, length: int) -> bytes:
        return await pread_via_map(self.stack, offset, length)

    def check(self, offset: int, length: int) -> None:
        got = self.run(self.read(offset, length))
        want = bytes(self.ref[offset : offset + length])
        if got != want:
            bad = next(i for i in range(length) if got[i] != want[i])
            raise AssertionError(
                f"read {offset}+{length} differs from the reference at byte {offset + bad}"
            )

    def change(self, op: str, offset: int, length: int, seed: int, fua: bool) -> Any:
        """The request, and (applied to the reference) what it changes."""
        if op == "write":
            data = random.Random(seed).randbytes(length)
            self.ref[offset : offset + length] = data
            return self.stack.pwrite(offset, data, fua)
        self.ref[offset : offset + length] = bytes(length)  # trimmed blocks read as zeros
        return (self.stack.zero if op == "zero" else self.stack.trim)(offset, length, fua)

    # --- rules ------------------------------------------------------------------------

    @rule(op=OPS, at=request(), seed=st.integers(0, 2**32), fua=st.booleans())
    def one(self, op: str, at: tuple[int, int], seed: int, fua: bool) -> None:
        self.run(self.change(op, *at, seed, fua))

    @rule(
        ops=st.tuples(OPS, OPS),
        first=request(),
        gap=st.integers(0, 8),
        n=st.integers(1, MAX_SECTORS),
        seed=st.integers(0, 2**32),
        fua=st.booleans(),
        swap=st.booleans(),
    )
    def pair(
        self,
        ops: tuple[str, str],
        first: tuple[int, int],
        gap: int,
        n: int,
        seed: int,
        fua: bool,
        swap: bool,
    ) -> None:
        """Two changes at once into neighbouring sectors (often one 4 KiB block)."""
        a, la = first
        b = a + la + gap * SECTOR
        lb = min(n * SECTOR, SIZE - b)
        if lb <= 0:
            return
        reqs = [self.change(ops[0], a, la, seed, fua), self.change(ops[1], b, lb, seed + 1, False)]

        async def both() -> None:
            await asyncio.gather(*(reversed(reqs) if swap else reqs))

        self.run(both())

    @rule()
    def flush(self) -> None:
        self.run(self.stack.flush())

    @rule(at=request())
    def read_back(self, at: tuple[int, int]) -> None:
        self.check(*at)

    @rule()
    def reopen(self) -> None:
        """Close the session and open it again (remote: on another stream node)."""
        self.run(self.close_stack())
        if not self.remote:
            self.ref[:] = self.world.image  # a discarded cache: a new session sees the version
        self.stack = self.run(self.open())

    @precondition(lambda self: self.remote)
    @rule()
    def cache_crash(self) -> None:
        """kill -9 of the cache service; the session rides it out."""
        self.world.crash_cache()

    @precondition(lambda self: self.remote)
    @rule()
    def cache_and_node_crash(self) -> None:
        """kill -9 of the cache service and of the session's stream node at once: the
        session opens again elsewhere from what the cache service kept."""
        self.world.crash_cache()
        self.run(self.close_stack())  # the node is gone: nothing of it is used again
        self.stack = self.run(self.open())

    @invariant()
    def golden_layers_unchanged(self) -> None:
        assert digest(self.world.root / "store" / "golden") == self.world.golden

    def teardown(self) -> None:
        try:
            self.check(0, SIZE)
        finally:
            self.run(self.close_stack())


def run_machine(world: World, scale: int = 1) -> None:
    machine = type("Machine", (WritePath,), {"world": world})
    base = settings.default
    runner: Callable[..., Any] = machine.TestCase
    runner.settings = settings(
        base,
        max_examples=max(2, base.max_examples // scale),
        stateful_step_count=max(10, base.stateful_step_count // scale),
    )
    runner().runTest()


def test_local_write_path_matches_the_model(tmp_path: Path) -> None:
    world = World(tmp_path, None)
    try:
        run_machine(world)
    finally:
        world.close()


@pytest.mark.timeout(1800)
def test_remote_write_path_matches_the_model_through_crashes(
    tmp_path: Path, nats_server: BusServer
) -> None:
    world = World(tmp_path, nats_server)
    try:
        run_machine(world, scale=6)  # each example costs cache service restarts
    finally:
        world.close()
