"""Work deferred until a burst has passed (services/cache/when_quiet.py): what a cache node
does with a new write cache's files while a storm's sessions are opening."""

from __future__ import annotations

import asyncio
import time

from services.cache.when_quiet import WhenQuiet
from tests.conftest import wait_for


async def test_a_burst_is_served_first_then_its_work_runs_in_order() -> None:
    done: list[str] = []
    quiet = WhenQuiet(done.append, quiet_s=0.2, max_wait_s=30)
    for i in range(5):
        quiet.add(f"k{i}")
        await asyncio.sleep(0.05)  # each add comes before the pause: pushed back again
        assert done == []
    quiet.add("k1")  # already waiting: once, at its first place
    await wait_for(lambda: len(done) == 5, "the burst's work")
    assert done == ["k0", "k1", "k2", "k3", "k4"]
    assert quiet.pending == {}


async def test_one_key_per_loop_turn() -> None:
    """Requests arriving meanwhile get served between the keys' work."""
    done: list[str] = []
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while len(done) < 3:
            turns += 1
            await asyncio.sleep(0)

    quiet = WhenQuiet(done.append, quiet_s=0.0, max_wait_s=1)
    for k in ("a", "b", "c"):
        quiet.add(k)
    await other_work()
    assert done == ["a", "b", "c"] and turns >= 3


async def test_a_storm_that_never_pauses_still_gets_its_work_done() -> None:
    done: list[str] = []
    quiet = WhenQuiet(done.append, quiet_s=10.0, max_wait_s=0.2)
    stop = time.monotonic() + 3
    while not done:  # an add every 20 ms: never quiet for 10 s
        assert time.monotonic() < stop, "work waited past max_wait_s"
        quiet.add(f"k{len(quiet.pending)}")
        await asyncio.sleep(0.02)
    assert done[0] == "k0"  # the oldest, at its deadline


async def test_failing_work_does_not_strand_the_rest_and_cancel_drops_all() -> None:
    done: list[str] = []

    def work(key: str) -> None:
        if key == "bad":
            raise OSError("disk gone")
        done.append(key)

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        quiet = WhenQuiet(work, quiet_s=0.0, max_wait_s=1)
        for k in ("bad", "ok"):
            quiet.add(k)
        await wait_for(lambda: done == ["ok"], "the work after the failing one")
        assert len(errors) == 1 and isinstance(errors[0]["exception"], OSError)
    finally:
        loop.set_exception_handler(old)

    quiet = WhenQuiet(done.append, quiet_s=0.05, max_wait_s=1)
    quiet.add("never")
    quiet.cancel()
    await asyncio.sleep(0.15)
    assert "never" not in done and quiet.pending == {}
