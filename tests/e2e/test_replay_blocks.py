"""`streamboot replay blocks SESSION` against the whole running system (`streamboot up`).

A real NBD client (qemu-io) reads and writes through a session, so the log holds its
BlocksRequested; the session is closed; the device boots again (a live session). The replay
must re-read exactly the recorded accesses through a replay session of its own, leave the
device's live session, its timeline and the boot profiles alone, never write the vdisk,
close its session, and refuse clearly what it cannot replay.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shared import bus
from shared.contracts.cache import wire
from shared.settings import Settings
from streamboot.block_replay import split_extents
from tests.e2e.test_system import cli, cli_json, events, provision, qemu_io, wait_all_alive
from tests.e2e.test_up import AVAILABLE, Up

pytestmark = pytest.mark.timeout(600)
MAC = "52:54:00:e2:e0:07"
MAC_OLD = "52:54:00:e2:e0:08"
MiB = 1 << 20


def session_story(data_dir: Path, sid: str, until: set[str]) -> list[dict[str, Any]]:
    """The session's events once every type in ``until`` is in the log (the stream node
    appends them through the registry a moment after the client leaves)."""
    for _ in range(120):
        story = events(data_dir, "--stream", f"session-{sid}")
        if until <= {e["type"] for e in story}:
            return story
        time.sleep(0.5)
    pytest.fail(f"session {sid}: {until} never all in the log: {[e['type'] for e in story]}")


def profile_boots(data_dir: Path, key: str) -> int:
    async def ask() -> int:
        settings = Settings(data_dir=data_dir)  # as the CLI: its user, its password
        nc = await bus.connect(
            settings.require_nats_url(), "e2e-cli", credentials=settings.nats_credentials("cli")
        )
        try:
            msg = await nc.request(wire.STATS, b"{}", timeout=10)
        finally:
            await nc.close()
        return int(json.loads(msg.data).get("profiles", {}).get(key, {}).get("boots", 0))

    return asyncio.run(ask())


def replay_fails(data_dir: Path, *args: str) -> tuple[dict[str, Any], str]:
    done = cli(data_dir, "replay", "blocks", *args, "--json", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    return json.loads(done.stdout), done.stderr


def test_replay_blocks_re_reads_a_past_boot(data_dir: Path, tmp_path: Path) -> None:
    assert {"registry", "stream", "cache"} <= set(AVAILABLE)
    golden = os.urandom(8 * MiB)
    image = tmp_path / "golden.raw"
    image.write_bytes(golden)

    up = Up(data_dir, AVAILABLE)
    try:
        up.wait_running()
        wait_all_alive(data_dir)
        provision(data_dir, MAC, image, "golden", "--hostname", "replay-001")

        # The boot to replay: reads, a write, a read of the written block.
        s1 = cli_json(data_dir, "session", "open", MAC)
        qemu_io(
            s1["nbd_uri"], "read 0 1M", "read 3M 300k", "write -P 0x5a 5M 64k",
            "read 5M 64k", "read 7M 4k",
        )  # fmt: skip
        story = session_story(data_dir, s1["session_id"], {"BlocksRequested", "SessionDetached"})
        cli(data_dir, "session", "close", s1["token"])
        recorded = [
            x for e in story if e["type"] == "BlocksRequested" for x in e["data"]["extents"]
        ]
        requests = split_extents(sorted(recorded, key=lambda x: x[0]))
        read = sum(x.length for x in requests if x.op == "r")
        written = sum(x.length for x in requests if x.op == "w")
        assert read >= 1 * MiB + 300 * 1024 + 64 * 1024 + 4096 and written == 64 * 1024

        # The device boots again: its live session must not notice the replay.
        s2 = cli_json(data_dir, "session", "open", MAC)
        timeline = cli_json(data_dir, "events", "replay", "--device", MAC)
        assert [b["session_id"] for b in timeline] == [s1["session_id"], s2["session_id"]]
        for _ in range(60):  # the cache learns the first boot's profile when it closes
            if profile_boots(data_dir, "golden@1") == 1:
                break
            time.sleep(0.5)
        assert profile_boots(data_dir, "golden@1") == 1

        # What cannot be replayed is refused, naming why.
        err, stderr = replay_fails(data_dir, "0190aaaa-0000-7000-8000-000000000000")
        assert err["kind"] == "not_found" and "unknown session" in stderr
        err, stderr = replay_fails(data_dir, s2["session_id"])
        assert "recorded no block accesses" in err["error"]
        err, stderr = replay_fails(data_dir, s1["session_id"], "--stream", "no-such-node")
        assert err["kind"] == "refused" and "'no-such-node' is not alive" in stderr

        report = cli_json(data_dir, "replay", "blocks", s1["session_id"])
        o, r = report["original"], report["replay"]
        assert o["requests"] == r["requests"] == r["planned"] == len(requests)
        assert o["bytes_read"] == r["bytes_read"] == read
        assert o["bytes_written"] == r["bytes_written"] == written
        assert r["errors"] == 0 and r["skipped_writes"] == 0 and report["replay_closed"]
        assert report["stream_node"] == s1["stream_node"]
        assert sum(p["requests"] for p in report["phases"]) == len(requests)
        assert sum(p["bytes"] for p in report["phases"]) == read + written
        assert report["verdict"].startswith("server time ")
        assert "throwaway" in report["writes"]

        # The replay ran as a session of its own, which the stream node served (its own
        # byte count) without logging its accesses again, and which is closed now.
        rid = report["replay_session_id"]
        replay_story = session_story(data_dir, rid, {"SessionDetached", "SessionClosed"})
        types = [e["type"] for e in replay_story]
        assert types[0] == "ReplaySessionOpened" and "BlocksRequested" not in types
        assert replay_story[0]["data"]["replay_of"] == s1["session_id"]
        [detached] = [e["data"] for e in replay_story if e["type"] == "SessionDetached"]
        assert (detached["bytes_read"], detached["bytes_written"]) == (read, written)
        [closed] = [e["data"] for e in replay_story if e["type"] == "SessionClosed"]
        assert closed["reason"] == "replay-finished"

        # The device's live session, its timeline and the boot profiles are as they were.
        assert [s["session_id"] for s in cli_json(data_dir, "session", "list")] == [
            s2["session_id"]
        ]
        assert cli_json(data_dir, "events", "replay", "--device", MAC) == timeline
        assert rid not in json.dumps(events(data_dir, "--mac", MAC))
        assert profile_boots(data_dir, "golden@1") == 1
        # Neither the replay's write nor the first boot's reached the vdisk.
        copy = tmp_path / "copy.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", s2["nbd_uri"], str(copy)],
            check=True, timeout=120,
        )  # fmt: skip
        assert copy.read_bytes() == golden

        # At the recorded pace too, and in the terminal.
        paced = cli_json(data_dir, "replay", "blocks", s1["session_id"], "--pace", "recorded")
        assert paced["replay"]["requests"] == len(requests) and paced["pace"] == "recorded"
        shown = cli(data_dir, "replay", "blocks", s1["session_id"], "--phases", "4").stdout
        assert "where the time went" in shown and "verdict: server time" in shown
        assert "slowest requests" in shown and len(report["phases"]) == 10

        # A replay needs the boot's vdisk version.
        small = tmp_path / "old.raw"
        small.write_bytes(os.urandom(MiB))
        provision(data_dir, MAC_OLD, small, "old")
        s3 = cli_json(data_dir, "session", "open", MAC_OLD)
        qemu_io(s3["nbd_uri"], "read 0 64k")
        session_story(data_dir, s3["session_id"], {"BlocksRequested"})
        cli(data_dir, "session", "close", s3["token"])
        cli(data_dir, "vdisk", "remove", "old")
        err, stderr = replay_fails(data_dir, s3["session_id"])
        assert err["kind"] == "not_found" and "vdisk 'old'" in stderr and "is gone" in stderr
    finally:
        assert up.stop() == 0, up.output
