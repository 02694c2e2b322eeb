"""The stream node's busy polling spins only while the machine has an idle CPU: on an
oversubscribed one the spin takes the CPU its client needs (docs/stream.md)."""

from __future__ import annotations

import asyncio

from services.stream.busy_poll import BusyPoll


async def spun(idle: bool) -> int:
    poll = BusyPoll(0.02, [object()], idle=lambda: idle)
    poll.touch(asyncio.get_running_loop())
    await asyncio.sleep(0.05)
    assert not poll.spinning
    return poll.turns


async def test_it_spins_while_a_cpu_is_idle() -> None:
    assert await spun(idle=True) > 0


async def test_it_does_not_spin_when_every_cpu_is_taken() -> None:
    assert await spun(idle=False) == 0
