"""Announced sessions are opened one per loop turn; a client whose announcement is still
queued has it opened at once (services/stream/sessions.py, SessionManager.prepare)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.stream.sessions import SessionManager
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from tests.doubles import NullSink, StaticResolver

SIZE = 1 << 20


def announce(tmp_path: Path, count: int) -> SessionManager:
    """A session manager whose resolver knows no token (a session can only come from its
    announcement), told of ``count`` sessions ``token-<i>`` / ``session-<i>`` at once."""
    image = tmp_path / "base.raw"
    image.write_bytes(b"\0" * SIZE)
    mgr = SessionManager(StaticResolver({}), NullSink(), StreamSettings(nbd_port=0, http_port=0))
    for i in range(count):
        spec = ExportSpec(f"session-{i}", "golden", 1, (image,), SIZE, write_cache="server-ram")
        mgr.prepare(f"token-{i}", spec)
    return mgr


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_client_whose_announcement_is_queued_jumps_the_queue(tmp_path: Path) -> None:
    count = 100
    mgr = announce(tmp_path, count)
    assert not mgr.sessions  # nothing built before the loop's next turn

    last = await mgr.acquire(f"token-{count - 1}")
    assert last is not None and last.session_id == f"session-{count - 1}"
    assert len(mgr.sessions) < count // 2, "the client's session waited for the others"

    await turns(2 * count)  # the rest, one per turn
    assert sorted(mgr.sessions) == sorted(f"token-{i}" for i in range(count))
    assert mgr.sessions[f"token-{count - 1}"] is last  # opened once
    await mgr.close_all()
    assert not mgr.sessions


async def test_a_session_closed_while_its_announcement_is_queued_never_opens(
    tmp_path: Path,
) -> None:
    mgr = announce(tmp_path, 3)
    assert mgr.close_session_id("session-2")  # the registry closed it meanwhile
    await turns(10)
    assert sorted(mgr.sessions) == ["token-0", "token-1"]
    assert await mgr.acquire("token-2") is None
    await mgr.close_all()
