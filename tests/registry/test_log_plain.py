"""The registry's log stays plain text when redirected: no ANSI colour codes from
FastStream's own handler (its start, its per-message lines, its shutdown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BusServer
from tests.registry.conftest import make_settings, start_registry


async def test_no_colour_codes_in_a_redirected_log(
    nats_server: BusServer, database_url: str, data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        data_dir, database_url=database_url, **nats_server.settings("registry")
    )
    svc = await start_registry(settings)
    try:
        await svc.app.add_device("52:54:00:00:0c:01")
    finally:
        await svc.stop()
    out, err = capfd.readouterr()
    assert "\x1b[" not in out + err, (out + err)[-2000:]


async def test_a_stop_logs_no_line_per_subscriber_task(
    nats_server: BusServer,
    database_url: str,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FastStream notes at INFO each of its subscriber tasks' done-callback: at a stop one
    line per worker, nothing an operator can act on (a task's failure is logged apart)."""
    caplog.set_level("INFO")
    settings = make_settings(
        data_dir, database_url=database_url, **nats_server.settings("registry")
    )
    svc = await start_registry(settings)
    await svc.stop()
    registry_lines = [r for r in caplog.records if r.name.startswith("streamboot.registry")]
    assert registry_lines, "the registry logged nothing: the check below would mean nothing"
    noted = [r.getMessage() for r in registry_lines if "is being executed" in r.getMessage()]
    assert not noted, noted
