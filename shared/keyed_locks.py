"""One asyncio lock per key (a session token, a version key), kept only while in use.

A map of ``key -> Lock`` filled with ``setdefault`` keeps a lock for every key ever asked
for: keys that come from the network (an NBD client's export name, a bus request) then
grow it without bound. Here a key's lock exists only while a task holds it or waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock (one task at a time per key)."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def busy(self, key: str) -> bool:
        """Whether a task holds or waits for ``key``'s lock."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)
