"""Small things a new user trips over in the CLI (issue 27's paper cuts)."""

from __future__ import annotations

import io
from pathlib import Path

from typer.testing import CliRunner

from streamboot.cli import app

runner = CliRunner()


def test_events_replay_refuses_an_invalid_mac_before_touching_anything(tmp_path: Path) -> None:
    got = runner.invoke(
        app, ["events", "replay", "--device", "nope", "--data-dir", str(tmp_path / "none")]
    )
    assert got.exit_code == 2
    assert "'nope' is not a MAC address" in got.output
    assert not (tmp_path / "none").exists()


def test_a_mac_is_taken_in_any_usual_spelling() -> None:
    from streamboot.commands import mac_argument

    for spelled in ("52-54-00-AA-00-01", "525400aa0001", " 52:54:00:aa:00:01 "):
        assert mac_argument(spelled) == "52:54:00:aa:00:01"


def test_flags_read_as_flags_in_the_help() -> None:
    got = runner.invoke(app, ["device", "list", "--help"], env={"COLUMNS": "100"})
    assert got.exit_code == 0
    line = next(x for x in got.output.splitlines() if "--json" in x)
    assert "<bool>" not in line and "print JSON" in line
    # Options that take a value still name its type.
    assert "<path>" in next(x for x in got.output.splitlines() if "--data-dir" in x)


def test_device_wake_wants_a_mac_or_a_collection(tmp_path: Path) -> None:
    for args in ([], ["52:54:00:00:00:01", "--collection", "lab"]):
        got = runner.invoke(app, ["device", "wake", *args, "--data-dir", str(tmp_path)])
        assert got.exit_code == 2 and "give a MAC or --collection" in got.output


def test_status_after_up_was_killed_says_so_instead_of_blaming_nats(tmp_path: Path) -> None:
    # What a `kill -9` of `up` leaves: runtime.json (endpoints of servers now gone) and no
    # supervisor holding the data dir's lock.
    (tmp_path / "runtime.json").write_text(
        '{"nats_url": "nats://127.0.0.1:9", "api_url": "http://127.0.0.1:9"}'
    )
    got = runner.invoke(app, ["status", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert got.exit_code == 1
    assert "`streamboot up` is not running" in got.output and "stale" in got.output
    assert "NATS" not in got.output and "nats://" not in got.output  # no stale endpoint either


def test_ids_and_macs_stay_whole_in_80_columns() -> None:
    from rich.console import Console

    from streamboot.tables import print_rows

    sid, mac = "01890a5d-ac96-774b-bcce-b302099a8057", "52:54:00:12:34:56"
    headers = ("session", "MAC", "hostname", "vdisk", "version", "node", "write cache")
    row = [sid, mac, "lab-001-long-host", "win11-base", "3", "stream-node-1", "1.0 MiB of 10 GiB"]
    for width in (80, 60, 200):
        console = Console(width=width, record=True, file=io.StringIO())
        print_rows(console, headers, [row], ids=("session", "MAC"))
        text = console.export_text()
        assert any(sid in line and mac in line for line in text.splitlines()), (width, text)
        assert "…" not in text and "lab-001-long-host" in text
