"""A table of the registry's beside the event log: state that is not a fact of the system
(console logins, jobs under way), shared by every registry process on the database.

It is created on first use (``CREATE ... IF NOT EXISTS`` under an advisory lock, so two
registries starting together do not race) rather than by the event store's migrations: the
event store is every service's, and its schema version says what the log holds.
"""

from __future__ import annotations

import asyncpg


class SideTable:
    def __init__(self, schema: str, lock_key: int) -> None:
        self._schema = schema
        self._lock_key = lock_key
        self._ready = False

    async def ready(self, conn: asyncpg.Connection) -> None:
        """Create the table (and its indexes), once per SideTable (one per database its
        owner talks to)."""
        if self._ready:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            await conn.execute(self._schema)
        self._ready = True
