"""The one rate-limited "say it once" logger for anything a flood can trigger.

A line per packet or per refused connection would let anyone who reaches a port fill the
disk and spend the CPU on formatting. Whatever a flood can trigger logs through a
:class:`LogBudget`: the first ``lines`` of an interval in full, the rest only counted (by
kind and source) and summed up in one line when the interval ends. Its users: the boot
service's DHCP and TFTP handlers, the per-address connection caps (:mod:`shared.address_cap`)
and the listeners out of file descriptors (:mod:`shared.fd_limit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

SUMMARY_SOURCES = 3  # the busiest sources named in a summary
MAX_KINDS = 32  # kinds may carry what a sender chose; past this many they count as "other"


class LogBudget:
    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        *,
        lines: int = 20,
        interval_s: float = 10.0,
        max_sources: int = 1000,
    ) -> None:
        self.logger, self.name = logger, name
        self.lines, self.interval_s, self.max_sources = lines, interval_s, max_sources
        self.suppressed = 0  # lines counted and not logged, since the start
        self._used = 0
        self._window_start = self._window_end = 0.0
        self._kinds: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._more_sources = False  # more distinct sources than max_sources
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, kind: str, source: str, msg: str, *args: object) -> None:
        """``msg % args`` at ``level`` if the interval's budget allows, else counted as
        ``kind`` from ``source`` for the interval's summary."""
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now >= self._window_end:
            self.flush()
            self._window_start, self._window_end = now, now + self.interval_s
            self._used = 0
        if self._used < self.lines:
            self._used += 1
            self.logger.log(level, msg, *args)
            return
        self.suppressed += 1
        if kind not in self._kinds and len(self._kinds) >= MAX_KINDS:
            kind = "other"
        self._kinds[kind] += 1
        if source in self._sources or len(self._sources) < self.max_sources:
            self._sources[source] += 1
        else:
            self._more_sources = True
        if self._timer is None:
            try:  # without a loop (a synchronous caller) the next interval's line says it
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._window_end - now, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Log the summary of what was counted and not logged, if anything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count = sum(self._kinds.values())
        if not count:
            return
        kinds = ", ".join(f"{kind} {n}" for kind, n in self._kinds.most_common())
        distinct = f"{len(self._sources)}{'+' if self._more_sources else ''}"
        top = ", ".join(f"{s} ({n})" for s, n in self._sources.most_common(SUMMARY_SOURCES))
        self.logger.warning(
            "%s: %d more lines not logged in the last %.1f s (%s) from %s sources; most from %s",
            self.name, count, min(time.monotonic(), self._window_end) - self._window_start,
            kinds, distinct, top,
        )  # fmt: skip
        self._kinds.clear()
        self._sources.clear()
        self._more_sources = False
