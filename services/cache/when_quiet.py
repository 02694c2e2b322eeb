"""Work that can wait until a burst of requests has passed.

A boot storm's session opens come in a burst while their clients are connecting; making
each new write cache's files right behind its open (three file creations, 0.3-0.6 ms of
CPU here) took it from the handshakes and opens still coming, on a machine whose cores the
storm already fills. The files are only needed by a session's first write, which makes
them itself if they have not come, so they can wait for a pause.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class WhenQuiet:
    """Runs ``work(key)`` for each added key once no key has been added for ``quiet_s``
    (each add pushes the start back), but never later than ``max_wait_s`` after the
    oldest was added; then one key per loop turn, so requests arriving meanwhile are
    served between them."""

    def __init__(self, work: Callable[[str], None], quiet_s: float, max_wait_s: float) -> None:
        self.work = work
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self.pending: dict[str, float] = {}  # key -> when added, oldest first
        self._handle: asyncio.Handle | None = None

    def add(self, key: str) -> None:
        self.pending.setdefault(key, time.monotonic())
        self._arm(self.quiet_s)

    def _arm(self, delay: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        oldest = next(iter(self.pending.values()))
        deadline = oldest + self.max_wait_s - time.monotonic()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, min(delay, deadline)), self._run_one)

    def _run_one(self) -> None:
        self._handle = None
        if not self.pending:
            return
        key = next(iter(self.pending))
        del self.pending[key]
        try:
            self.work(key)
        finally:
            if self.pending:
                self._arm(0.0)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.pending.clear()
