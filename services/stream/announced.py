"""Sessions the registry announced (announce.py) that are not opened yet.

They queue here and are opened one per loop turn, so the connections that arrive meanwhile
get their handshakes answered between them (a storm's announcements would otherwise build
every stack before the loop reads a socket); a client whose announcement is still queued
has it taken out and opened at once (``SessionManager``, the owner of the sessions'
lifecycle, does the opening)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.stream.spec import ExportSpec


class AnnounceQueue:
    def __init__(self, open_one: Callable[[str, ExportSpec], object]) -> None:
        self._open_one = open_one
        self._specs: dict[str, ExportSpec] = {}
        self._pacer: asyncio.Task[None] | None = None

    def add(self, token: str, spec: ExportSpec) -> None:
        self._specs[token] = spec
        if self._pacer is None:
            self._pacer = asyncio.get_running_loop().create_task(self._open_queued())

    async def _open_queued(self) -> None:
        try:
            while self._specs:
                token = next(iter(self._specs))
                self._open_one(token, self._specs.pop(token))
                await asyncio.sleep(0)  # the sockets' turn
        finally:
            self._pacer = None

    def take(self, token: str) -> ExportSpec | None:
        """The queued announcement of ``token``, out of the queue (its client came first)."""
        return self._specs.pop(token, None)

    def holds(self, session_id: str) -> bool:
        return any(s.session_id == session_id for s in self._specs.values())

    def discard(self, session_id: str) -> bool:
        """Forget the announcement of this session (closed before it opened); False if none."""
        for token, spec in list(self._specs.items()):
            if spec.session_id == session_id:
                del self._specs[token]
                return True
        return False

    def stop(self) -> asyncio.Task[None] | None:
        """No announced session opens after this; the pacer, cancelled, to be awaited."""
        self._specs.clear()
        if self._pacer is not None:
            self._pacer.cancel()
        return self._pacer
