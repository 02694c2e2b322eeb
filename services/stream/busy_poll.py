"""Busy polling: after a request, the event loop keeps polling its sockets for a short
window instead of going to sleep, while only a few connections are open.

Why: a client reading at queue depth 1 sends its next request some 50-150 µs after our
reply. If the loop is asleep in ``epoll_wait`` by then, the kernel must wake this process
(here, a halted vCPU) before the request is even read, and that wake-up was the largest
part of what one client waited for per read beyond nbdkit (the boot trace replayed by one
client: 23 ms without polling, 18 ms with a 200 µs window; docs/stream.md). Polling keeps a
callback ready, so uvloop polls with a zero timeout; each turn yields the CPU to any other
runnable task on it (the cache service, NATS), so the spin only uses time nobody wants.

The spin pays only while a CPU is idle: on a machine with more runnable tasks than CPUs,
``sched_yield`` hands the CPU over for a moment but the spin still counts as this process's
time, so the scheduler runs it later than a sleeper when the request comes, and the client
(on the same machine, or any other work) loses the CPU it spun on. So nothing spins while
the load average is at or above the CPUs this process may run on (read at most once a
second).

With many connections the loop is busy anyway and the wake-ups are shared, while a spin
would only burn the CPU between a storm's requests and make the node look saturated: at
``max_connections`` open connections and above, nothing spins.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sized
from time import monotonic

# A few clients at queue depth 1 are what waits on wake-ups; with ten clients replaying
# the boot trace as fast as they can, polling gained nothing (bench/bootstorm.py).
MAX_CONNECTIONS = 8
LOAD_CHECK_S = 1.0


def cpu_idle() -> bool:
    """Whether the machine has a CPU to spin on: load average below the CPUs we may use."""
    return os.getloadavg()[0] < len(os.sched_getaffinity(0))


class BusyPoll:
    def __init__(
        self,
        window_s: float,
        connections: Sized,
        max_connections: int = MAX_CONNECTIONS,
        idle: Callable[[], bool] = cpu_idle,
    ) -> None:
        self.window_s = window_s
        self.connections = connections
        self.max_connections = max_connections
        self.spinning = False
        self.turns = 0  # loop turns spent polling, for tests and curiosity
        self._until = 0.0
        self.idle = idle  # whether a CPU is free to spin on (read at most once a second)
        self._cpu_idle = True
        self._checked = -LOAD_CHECK_S

    def touch(self, loop: asyncio.AbstractEventLoop) -> None:
        """A request arrived: keep polling until ``window_s`` from now."""
        if not self.window_s or len(self.connections) >= self.max_connections:
            return
        now = monotonic()
        if now - self._checked >= LOAD_CHECK_S:
            self._checked, self._cpu_idle = now, self.idle()
        if not self._cpu_idle:
            return
        self._until = now + self.window_s
        if not self.spinning:
            self.spinning = True
            loop.call_soon(self._turn, loop)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        if monotonic() >= self._until or len(self.connections) >= self.max_connections:
            self.spinning = False
            return
        self.turns += 1
        os.sched_yield()
        loop.call_soon(self._turn, loop)
