"""Token buckets: how many requests a source (or everyone together) may make per second.

A datagram's source address can be forged, so per-source state is bounded: once there are
``max_sources`` buckets, the idle ones (full again) are forgotten, and if none is idle all of
them are (a forgotten source starts over with a full bucket, never with less).
"""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per request."""

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic() if now is None else now

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class PerSourceRate:
    """A :class:`TokenBucket` per source; ``rate`` <= 0 allows everything."""

    def __init__(self, rate: float, burst: float, max_sources: int = 65536) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, source: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_idle(now)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, now)
        return bucket.allow(now)

    def _forget_idle(self, now: float) -> None:
        refill_s = self.burst / self.rate
        idle = [s for s, b in self._buckets.items() if now - b.stamp >= refill_s]
        if not idle:
            self._buckets.clear()
            return
        for source in idle:
            del self._buckets[source]
