"""Token buckets per source: the rate, the burst, and bounded memory under forged sources."""

from __future__ import annotations

from services.boot.rate_limit import PerSourceRate


def test_burst_then_rate_per_source() -> None:
    limit = PerSourceRate(rate=4, burst=3)
    assert [limit.allow("a", now=100.0) for _ in range(5)] == [True] * 3 + [False] * 2
    assert limit.allow("b", now=100.0)  # another source has its own bucket
    assert not limit.allow("a", now=100.125)
    assert limit.allow("a", now=100.25)  # one token a quarter of a second
    assert not limit.allow("a", now=100.25)


def test_no_limit_when_the_rate_is_zero() -> None:
    limit = PerSourceRate(rate=0, burst=0)
    assert all(limit.allow("a", now=0.0) for _ in range(1000))


def test_memory_is_bounded_and_a_forgotten_source_starts_full() -> None:
    limit = PerSourceRate(rate=1, burst=2, max_sources=100)
    for n in range(10_000):  # forged sources, one request each
        limit.allow(f"10.0.{n // 256}.{n % 256}", now=float(n) / 1000)
        assert len(limit._buckets) <= 100
    # An active source keeps its (empty) bucket while idle ones are forgotten first.
    limit = PerSourceRate(rate=1, burst=2, max_sources=3)
    assert limit.allow("busy", now=10.0) and limit.allow("busy", now=10.0)
    limit.allow("idle1", now=0.0)
    limit.allow("idle2", now=0.0)
    limit.allow("new", now=10.5)  # full: the idle ones go
    assert not limit.allow("busy", now=10.5)
