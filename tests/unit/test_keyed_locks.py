"""Per-key locks that are kept only while in use (shared/keyed_locks.py)."""

from __future__ import annotations

import asyncio

import pytest

from shared.keyed_locks import KeyedLocks


async def test_one_holder_per_key_and_nothing_kept_after() -> None:
    locks = KeyedLocks()
    inside: list[str] = []
    order: list[str] = []

    async def use(key: str, name: str) -> None:
        async with locks.hold(key):
            inside.append(key)
            assert inside.count(key) == 1  # alone with this key
            order.append(name)
            await asyncio.sleep(0)
            inside.remove(key)

    await asyncio.gather(use("a", "a1"), use("a", "a2"), use("b", "b1"))
    assert sorted(order) == ["a1", "a2", "b1"]
    assert len(locks) == 0 and not locks.busy("a")


async def test_a_failing_holder_leaves_nothing_behind() -> None:
    locks = KeyedLocks()
    for i in range(50):
        with pytest.raises(LookupError):
            async with locks.hold(f"unknown-{i}"):
                assert locks.busy(f"unknown-{i}")
                raise LookupError
    assert len(locks) == 0
