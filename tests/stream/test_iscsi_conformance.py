"""libiscsi's conformance suite (``iscsi-test-cu``) against streamboot and against the
reference target ``tgt`` (tgtd on loopback, a copy of the same image as its backing store),
in the same run: every test that passes on tgt passes on streamboot.

CUnit counts a test that skips itself (a command the target reports as not implemented)
as passed, on both sides alike; docs/stream.md lists what streamboot does not implement.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.stream.iscsi.server import TARGET_PREFIX
from tests.stream.conftest import ServerThread
from tests.stream.tgt import tgt_target

SUITE_TIMEOUT = 1800  # minutes on a loaded machine: past the default test timeout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("iscsi-test-cu") and shutil.which("tgtd")),
        reason="libiscsi-bin and tgt are not installed (make test-deps)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd runs as root"),
    # Both runs of the suite go at once, each within SUITE_TIMEOUT.
    pytest.mark.timeout(SUITE_TIMEOUT + 300),
]


def results(xml: Path) -> dict[str, bool]:
    """``Suite.Test`` -> passed, from CUnit's automated report (a test run several times
    passes only if it passed every time)."""
    out: dict[str, bool] = {}
    for suite in ET.parse(xml).getroot().iter("CUNIT_RUN_SUITE"):
        for s in suite:
            name = (s.findtext("SUITE_NAME") or "").strip()
            for rec in s.iter("CUNIT_RUN_TEST_RECORD"):
                for r in rec:
                    key = f"{name}.{(r.findtext('TEST_NAME') or '').strip()}"
                    out[key] = out.get(key, True) and r.tag == "CUNIT_RUN_TEST_SUCCESS"
    return out


def run_suite(url: str, cwd: Path) -> dict[str, bool]:
    cwd.mkdir()
    # -d: the destructive tests too (streamboot's writes land in the session's write cache).
    subprocess.run(
        ["iscsi-test-cu", "-d", "-x", url], cwd=cwd, capture_output=True, timeout=SUITE_TIMEOUT
    )
    return results(cwd / "CUnitAutomated-Results.xml")


@pytest.fixture
def tgt(images, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    disk = tmp_path / "tgt.raw"
    shutil.copyfile(images["base"], disk)
    with tgt_target(disk) as url:
        yield url


def test_passes_everything_tgt_passes(make_server, tgt: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: ServerThread = make_server(session_linger_s=60.0)
    ours_url = f"iscsi://127.0.0.1:{server.servers.iscsi_port}/{TARGET_PREFIX}tok-a/0"
    # Both suites at once: each spends its time waiting on its target's answers.
    with ThreadPoolExecutor(2) as pool:
        ours_run = pool.submit(run_suite, ours_url, tmp_path / "streamboot")
        theirs_run = pool.submit(run_suite, tgt, tmp_path / "tgt")
        ours, theirs = ours_run.result(), theirs_run.result()
    assert len(theirs) > 100 and set(ours) == set(theirs)
    table = "\n".join(
        f"{name}: streamboot {'pass' if ours[name] else 'FAIL'}, "
        f"tgt {'pass' if theirs[name] else 'FAIL'}"
        for name in sorted(theirs)
    )
    print(f"\n{table}")
    behind = sorted(n for n, ok in theirs.items() if ok and not ours[n])
    assert not behind, f"tgt passes, streamboot fails: {behind}"
