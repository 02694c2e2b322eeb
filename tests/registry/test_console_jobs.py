"""vdisk work the console shows as it goes, in a real browser (Debian's chromium): an
import run by the real CLI reports its progress live on the vdisks page, and a maintenance
session's writes are committed from the console (a real stream node and cache service, a
real NBD client writing), through a confirmation, with the job advancing to its version."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from shared.vdisk_layout import open_chain
from tests.registry.conftest import Registry, write_image
from tests.registry.test_console_browser import CHROMIUM, browser, log_in, page, shot
from tests.registry.test_maintenance import data_plane, provision, qemu_io

__all__ = ["browser", "page"]  # fixtures
MiB = 1 << 20
MAC = "52:54:00:c0:00:42"
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium"),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) missing"),
]
# Every state a job's row showed, as the page changed (the live stream's swaps), told to
# the test (the page loads itself again when the job ends).
WATCH_JOBS = """() => {
  const seen = () => document.querySelectorAll('#jobs [data-job]').forEach(
    (j) => window.jobSeen(j.dataset.state + ':' + (j.querySelector('.pill') || {}).textContent));
  new MutationObserver(seen).observe(document.getElementById('jobs'), {subtree: true, childList: true});
}"""


async def test_an_import_shows_its_progress_live(
    page: Any, registry: Registry, data_dir: Path, tmp_path: Path
) -> None:
    # Big enough that copying and checksumming take more than one report's interval.
    chunks = {at: os.urandom(256 * 1024) for at in range(0, 512 * MiB, 8 * MiB)}
    image = await asyncio.to_thread(write_image, data_dir / "big.raw", 512 * MiB, chunks)
    await log_in(page, registry)
    await page.click("nav >> text=vdisks")
    await page.wait_for_selector("text=no imports or commits yet")
    states: list[str] = []
    await page.expose_function("jobSeen", lambda state: states.append(state))
    await page.evaluate(WATCH_JOBS)
    imported = asyncio.create_task(
        registry.cli_json("vdisk", "import", str(image), "--name", "big")
    )
    await page.wait_for_selector("#jobs [data-job][data-state='running']", timeout=60_000)
    await shot(page, tmp_path, "import-running")
    await imported
    await page.wait_for_selector("#jobs [data-state='done'] .pill:has-text('done: v1')")
    running = {s for s in states if s.startswith("running")}
    assert running, states  # it showed as it went, not only once done
    assert any("%" in s for s in running), states
    async with registry.http() as http:
        [job] = (await http.get("/jobs")).json()
    assert job["kind"] == "import" and job["vdisk"] == "big" and job["state"] == "done"
    assert job["version"] == 1 and job["by"] == "bootstrap-admin"
    # The audit trail has the import's version, not its progress reports.
    audit = [e["data"]["path"] for e in await registry.app.events(type_="AdminActionPerformed")]
    assert "/vdisks/big/versions" in audit and not [p for p in audit if "/jobs" in p], audit
    await shot(page, tmp_path, "import-done")

    # An import whose CLI was killed half-way shows as interrupted, where it stopped.
    async with registry.http() as http:
        lost = (await http.post("/jobs", json={"vdisk": "big"})).json()
        await http.put(f"/jobs/{lost['id']}", json={"phase": "copy", "done": 1, "total": 4})
    await page.wait_for_selector(f"#jobs [data-job='{lost['id']}'][data-state='running']")
    async with registry.app.store.pool.acquire() as conn:
        await conn.execute("UPDATE console_jobs SET updated_at = now() - interval '2 min'")
    await page.wait_for_selector(
        f"#jobs [data-job='{lost['id']}'] .pill:has-text('interrupted at 25%')"
    )
    assert "the import's CLI stopped" in await page.inner_text(f"[data-job='{lost['id']}']")
    await shot(page, tmp_path, "import-interrupted")


async def test_a_maintenance_session_is_committed_from_the_console(
    page: Any, registry: Registry, tmp_path: Path
) -> None:
    image = write_image(registry.data_dir / "base.raw", 4 * MiB, {0: b"MBR", 2 * MiB: b"old"})
    await provision(registry, MAC, "golden-pc", "win", image)
    async with data_plane(registry, f"stream-console-{os.getpid()}"):
        s = await registry.app.open_session(MAC, maintenance=True)
        await qemu_io(s["nbd_uri"], f"write -P 0xab {2 * MiB} 64k")
        await registry.app.close_session(s["session_id"])

        await log_in(page, registry)
        await page.goto(registry.api_url + "/console/vdisks/win")
        await page.click("button:has-text('Commit as v2')")
        dialog = page.locator("dialog#confirm")
        text = await dialog.inner_text()
        assert "golden-pc's maintenance writes as win v2" in text
        assert "no device boots it until you promote it" in text
        await shot(page, tmp_path, "commit-confirm")
        await page.click("#confirm-ok")
        await page.wait_for_selector(
            "#jobs [data-state='done'] .pill:has-text('done: v2')", timeout=120_000
        )
        # The page loads again once the job ended: v2 is in its versions.
        await page.wait_for_selector("tr[data-version='2'] .pill:has-text('maintenance')")
        assert await page.locator("button:has-text('Commit as')").count() == 0
        await shot(page, tmp_path, "commit-done")
    v2 = registry.app.vdisk_view("win")
    assert v2["latest_version"] == 2
    with open_chain(v2["latest_layers"]) as chain:
        assert chain.pread(2 * MiB, 64 * 1024) == b"\xab" * 64 * 1024
    audit = await registry.app.events(type_="AdminActionPerformed", limit=50)
    assert any(e["data"]["path"] == "/vdisks/win/commit" for e in audit)
    assert [e for e in page.errors] == [], page.errors
