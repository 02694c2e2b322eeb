"""A service stops in order (shared/service.py): what ``on_stopping`` names first, while the
service's tasks still run (a server finishing its requests), then the tasks are cancelled,
then the ``on_stop`` cleanups in reverse order of registration."""

from __future__ import annotations

import asyncio

from shared.service import ServiceRuntime
from shared.settings import Settings


async def test_stopping_hooks_run_while_the_tasks_still_run_then_cleanups_in_reverse() -> None:
    rt = ServiceRuntime("stream", Settings())
    seen: list[str] = []
    task = rt.spawn(asyncio.Event().wait(), "server")

    async def finish_requests() -> None:
        seen.append(f"stopping (server running: {not task.done()})")

    async def cleanup(name: str) -> None:
        seen.append(f"{name} (server cancelled: {task.cancelled()})")

    rt.on_stop(lambda: cleanup("first registered"))
    rt.on_stopping(finish_requests)
    rt.on_stop(lambda: cleanup("last registered"))
    await rt.stop()  # no NATS connection was made: its drain is skipped
    assert seen == [
        "stopping (server running: True)",
        "last registered (server cancelled: True)",
        "first registered (server cancelled: True)",
    ]
