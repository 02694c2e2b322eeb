"""The web console in a real browser (Debian's chromium driven by Playwright), against the
real registry: log in, add a device, assign a vdisk, watch a boot advance live to booted,
promote a version with its confirmation, find it in the audit trail; import devices from
a CSV file and make a collection; a login outlives a registry restart; and the page never
asks anything of another origin. Screenshots land in the test's tmp dir."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.registry.console.logins import COOKIE
from shared import bus
from shared.event_log import EventClient
from shared.events import BootRequested, ClientBooted, HandoffRedeemed, SessionAttached
from streamboot.embedded.proc import free_port
from tests.registry.conftest import TOKEN, Registry, start_registry, write_image

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAC = "52:54:00:c0:00:01"
MiB = 1 << 20
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Any, registry: Registry) -> AsyncIterator[Any]:
    """A page that records every request it makes (to check their origin)."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    pg = await context.new_page()
    pg.requests = []  # type: ignore[attr-defined]
    pg.on("request", lambda r: pg.requests.append(r.url))
    # Script errors and Content-Security-Policy violations show as console errors.
    pg.errors = []  # type: ignore[attr-defined]
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    try:
        yield pg
    finally:
        await context.close()


async def log_in(page: Any, registry: Registry, token: str = TOKEN) -> None:
    await page.goto(registry.api_url + "/")
    assert page.url.endswith("/login")
    await page.fill("input[name=token]", token)
    await page.click("button:has-text('Log in')")
    await page.wait_for_url(registry.api_url + "/")


async def shot(page: Any, tmp_path: Path, name: str) -> None:
    await page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


async def test_an_operators_morning(
    page: Any, registry: Registry, data_dir: Path, tmp_path: Path
) -> None:
    image = write_image(data_dir / "v1.raw", 4 * MiB, {0: b"MBR"})
    await registry.cli_json("vdisk", "import", str(image), "--name", "demo")
    image2 = write_image(data_dir / "v2.raw", 4 * MiB, {0: b"MBR", MiB: b"two"})
    await registry.cli_json("vdisk", "import", str(image2), "--name", "demo")

    await page.goto(registry.api_url + "/")
    await shot(page, tmp_path, "01-login")
    await log_in(page, registry)
    await page.wait_for_selector("text=Services and nodes")
    await shot(page, tmp_path, "02-dashboard")

    # Add a device, then assign it the vdisk.
    await page.click("nav >> text=Devices")
    await page.click("summary:has-text('Add a device')")
    await page.fill("input[name=mac]", MAC)
    await page.fill("input[name=hostname]", "lab-001")
    await page.fill("input[name=collection]", "lab")
    await page.click("button:has-text('Add device')")
    row = page.locator(f"tr[data-mac='{MAC}']")
    await row.wait_for()
    assert "lab-001" in await row.inner_text()
    await row.locator("button:has-text('Assign')").click()
    await row.locator(".vdisks .pill:has-text('demo')").wait_for()
    assert registry.app.show_device(MAC)["assignment"]["default"] == "demo"
    # Edit it in place: a kernel argument for its kernel-direct boots.
    await row.locator("button:has-text('Edit')").click()
    edit = page.locator("tr.edit:visible")
    await edit.locator("input[name=kernel_args]").fill("console=ttyS0")
    await edit.locator("input[name=smbios_uuid]").fill("4C4C4544-0000-1000-8000-0000000000AA")
    await edit.locator("button:has-text('Save lab-001')").click()
    await page.locator(".toast:has-text('lab-001 saved')").wait_for()
    assert registry.app.show_device(MAC)["kernel_args"] == "console=ttyS0"
    assert registry.app.show_device(MAC)["smbios_uuid"] == "4c4c4544-0000-1000-8000-0000000000aa"
    await shot(page, tmp_path, "03-devices")

    # A boot, as the services record it, advances live on the Boots page.
    await page.click("nav >> text=Boots")
    await page.wait_for_selector("text=no boots yet")
    nc = await bus.connect(registry.bus.url_for("boot"), "console-test-boot")
    ns = await bus.connect(registry.bus.url_for("stream"), "console-test-stream")
    try:
        boot, stream = EventClient(nc, "boot"), EventClient(ns, "stream")
        await boot.emit(BootRequested(mac=MAC, arch=0))
        board = page.locator(f"tr.boot[data-mac='{MAC}']")
        await page.wait_for_selector(f"tr.boot[data-mac='{MAC}'][data-phase='discovered']")
        session = await registry.app.open_session(MAC)
        sid = session["session_id"]
        await page.wait_for_selector(f"tr.boot[data-mac='{MAC}'][data-phase='session open']")
        await boot.emit(HandoffRedeemed(session_id=sid, client_addr="127.0.0.1"))
        await stream.emit(
            SessionAttached(
                session_id=sid, stream_node="node-1", protocol="nbd", client_addr="127.0.0.1"
            )
        )
        await page.wait_for_selector(f"tr.boot[data-mac='{MAC}'][data-phase='OS attached']")
        await boot.emit(ClientBooted(session_id=sid, mac=MAC))
        await page.wait_for_selector(f"tr.boot[data-mac='{MAC}'][data-phase='booted']")
    finally:
        await nc.close()
        await ns.close()
    await shot(page, tmp_path, "04-boots")
    done = await board.locator("td.phase.done").count()
    assert done == 4  # discovered, session open, hand-off, OS attached; booted is "now"
    assert "lab-001" in await board.inner_text()  # the machine by its name, not only its MAC

    # Its timeline, by a click on the row.
    await board.click()
    await page.wait_for_selector("h2:has-text('booted')")
    text = await page.inner_text("main")
    for step in ("BootRequested", "SessionOpened", "HandoffRedeemed", "ClientBooted"):
        assert step in text
    await shot(page, tmp_path, "05-timeline")

    # Promote v2 to production: the confirmation names who it reaches.
    await page.goto(registry.api_url + "/console/vdisks/demo")
    v2 = page.locator("tr[data-version='2']")
    await v2.locator("button:has-text('Promote to production')").click()
    dialog = page.locator("dialog#confirm")
    await dialog.wait_for()
    assert "lab-001" in await dialog.inner_text()
    assert "1 live session(s) keep their version" in await dialog.inner_text()
    await shot(page, tmp_path, "06-confirm")
    await page.click("#confirm-ok")
    await page.wait_for_selector("tr[data-version='2'] .pill:has-text('current production')")
    assert registry.app.vdisk_view("demo")["production_version"] == 2
    await shot(page, tmp_path, "07-vdisk")

    # The audit trail names the admin token for every change made in the console.
    await page.click("nav >> text=Audit")
    audit = await page.inner_text("#audit")
    assert "POST /vdisks/demo/promote" in audit and "POST /devices" in audit
    assert "POST /assignments" in audit and "bootstrap-admin" in audit
    assert f"PATCH /devices/{MAC}" in audit
    await shot(page, tmp_path, "08-audit")

    # Every request the page made went to its own origin, and nothing failed in it.
    foreign = [u for u in page.requests if not u.startswith(registry.api_url + "/")]
    assert foreign == [], foreign
    assert page.errors == [], page.errors


async def test_a_viewer_sees_but_cannot_change(
    page: Any, registry: Registry, tmp_path: Path
) -> None:
    await registry.cli_json("device", "add", MAC, "--hostname", "lab-009")
    viewer = (await registry.cli_json("token", "create", "--name", "looker", "--role", "viewer"))[
        "token"
    ]
    await log_in(page, registry, viewer)
    await page.click("nav >> text=Devices")
    await page.locator(f"tr[data-mac='{MAC}']").wait_for()
    assert await page.locator("button:has-text('Remove')").count() == 0
    assert await page.locator("text=Add a device").count() == 0
    # Even a request crafted in the page is refused by the API's gate, with its CSRF token.
    status = await page.evaluate(
        """async (mac) => (await fetch('/devices/' + mac, {method: 'DELETE', headers:
        {'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}})).status""",
        MAC,
    )
    assert status == 403
    assert registry.app.show_device(MAC)["hostname"] == "lab-009"
    await shot(page, tmp_path, "viewer-devices")


async def test_a_cookie_without_its_csrf_token_changes_nothing(
    page: Any, registry: Registry
) -> None:
    await log_in(page, registry)
    status = await page.evaluate(
        """async () => (await fetch('/devices', {method: 'POST', headers:
        {'Content-Type': 'application/json'}, body: JSON.stringify({mac: '52:54:00:c0:00:02'})}
        )).status"""
    )
    assert status == 403
    assert registry.app.projection.devices == {}


async def test_the_api_docs_work_offline(page: Any, registry: Registry, tmp_path: Path) -> None:
    await page.goto(registry.api_url + "/docs")
    await page.wait_for_selector(".swagger-ui :text('Add Device')")
    await shot(page, tmp_path, "docs")
    await page.goto(registry.api_url + "/redoc")
    await page.wait_for_selector("[role=menuitem] :text('Add Device')")
    await shot(page, tmp_path, "redoc")
    foreign = [
        u
        for u in page.requests
        if not u.startswith(registry.api_url + "/") and not u.startswith(("data:", "blob:"))
    ]
    assert foreign == [], foreign


async def test_devices_from_a_csv_file_and_a_collection(
    page: Any, registry: Registry, data_dir: Path, tmp_path: Path
) -> None:
    image = write_image(data_dir / "v1.raw", 2 * MiB, {0: b"MBR"})
    await registry.cli_json("vdisk", "import", str(image), "--name", "demo")
    await log_in(page, registry)
    await page.click("nav >> text=Devices")
    await page.click("summary:has-text('Import devices from a CSV file')")
    upload = page.locator("input[name=csv]")

    # A file with a bad row: each bad line is listed, nothing is imported.
    bad = b"mac,hostname\n52:54:00:d0:00:01,csv-1\nnot-a-mac,csv-2\n52:54:00:d0:00:03,csv-1\n"
    await upload.set_input_files({"name": "bad.csv", "mimeType": "text/csv", "buffer": bad})
    await page.click("button:has-text('Import')")
    errors = page.locator("#import-errors")
    await errors.locator("li").nth(1).wait_for()
    text = await errors.inner_text()
    assert "line 3: invalid MAC" in text and "line 4: hostname csv-1 is on line 2" in text
    assert registry.app.projection.devices == {}
    await shot(page, tmp_path, "import-refused")

    good = b"mac,hostname,vdisks\n52:54:00:d0:00:01,csv-1,demo\n52:54:00:d0:00:02,csv-2,\n"
    await upload.set_input_files({"name": "good.csv", "mimeType": "text/csv", "buffer": good})
    await page.click("button:has-text('Import')")
    await page.locator(".toast:has-text('2 device(s) imported')").wait_for()
    await page.locator("tr[data-mac='52:54:00:d0:00:02']").wait_for()
    assert await errors.is_hidden()
    assert registry.app.show_device("52:54:00:d0:00:01")["assignment"]["default"] == "demo"
    await shot(page, tmp_path, "import-done")

    # A collection of both, booting demo.
    await page.click("nav >> text=Collections")
    await page.click("summary:has-text('Create a collection')")
    form = page.locator("#add-collection form")
    await form.locator("input[name=name]").fill("lab")
    await form.locator("select[name=vdisk]").select_option("demo")
    await form.locator("select[name=devices]").select_option(
        ["52:54:00:d0:00:01", "52:54:00:d0:00:02"]
    )
    await form.locator("button:has-text('Create collection')").click()
    row = page.locator("tr[data-collection='lab']")
    await row.wait_for()
    assert "csv-1, csv-2" in await row.locator(".members").inner_text()
    assert "demo" in await row.locator(".vdisks").inner_text()
    a = registry.app.show_device("52:54:00:d0:00:02")["assignment"]
    assert a == {"vdisks": ["demo"], "default": "demo", "source": "collection lab"}
    await shot(page, tmp_path, "collections")

    # Renamed: its devices and vdisk go with it.
    await row.locator("input[name=to]").fill("room-2")
    await row.locator("button:has-text('Rename')").click()
    row = page.locator("tr[data-collection='room-2']")
    await row.wait_for()
    assert "csv-1, csv-2" in await row.locator(".members").inner_text()
    assert registry.app.show_device("52:54:00:d0:00:02")["collection"] == "room-2"

    # Deleted through its confirmation, which names who leaves it and what they lose.
    await row.locator("button:has-text('Delete')").click()
    dialog = page.locator("dialog#confirm")
    text = await dialog.inner_text()
    assert "Its 2 device(s) leave it and stay registered: csv-1, csv-2." in text, text
    assert "1 of them boot only its vdisks and will have none" in text, text
    await page.click("#confirm-ok")
    await page.locator("text=no collections yet").wait_for()
    assert registry.app.show_device("52:54:00:d0:00:02")["collection"] is None
    # The refused import's 400 is the one failed request.
    assert [e for e in page.errors if "400 (Bad Request)" not in e] == [], page.errors


async def test_a_login_outlives_a_restart_and_is_every_registrys(
    browser: Any, registry: Registry, tmp_path: Path
) -> None:
    """Logins live in PostgreSQL: a second registry process on the same database knows
    them, a logout on one ends them on all, and a restarted registry keeps them."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    other = registry.settings.model_copy(
        update={"api_port": free_port(), "node_id": registry.settings.node_id + "-b"}
    )
    other_url = f"http://127.0.0.1:{other.api_port}"
    b = await start_registry(other)
    try:
        await log_in(page, registry)
        # Cookies are per host, not per port: the browser shows registry B its cookie.
        await page.goto(other_url + "/console/devices")
        assert page.url == other_url + "/console/devices"
        await page.click("button:has-text('log out')")
        await page.wait_for_url(other_url + "/login")
        await page.goto(registry.api_url + "/")
        assert page.url.endswith("/login")

        # Logged in on B, B restarts (nothing of it stays in memory): still logged in.
        await page.goto(other_url + "/")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button:has-text('Log in')")
        await page.wait_for_url(other_url + "/")
        await b.stop()
        b = await start_registry(other)
        await page.goto(other_url + "/console/sessions")
        assert page.url == other_url + "/console/sessions"
        await page.wait_for_selector("text=no live sessions")
        await shot(page, tmp_path, "after-restart")

        # The table holds hashes: neither the cookie's login id nor the API token.
        (cookie,) = [c["value"] for c in await context.cookies() if c["name"] == COOKIE]
        async with registry.app.store.pool.acquire() as conn:
            rows = [dict(r) for r in await conn.fetch("SELECT * FROM console_logins")]
        assert len(rows) == 1 and rows[0]["expires_at"] > rows[0]["created_at"]
        assert cookie not in str(rows) and TOKEN not in str(rows)
        # A revoked token ends its logins everywhere (a named one: the built-in admin's
        # cannot be revoked).
        viewer = (await registry.cli_json("token", "create", "--name", "temp", "--role", "viewer"))[
            "token"
        ]
        await context.clear_cookies()
        await log_in(page, registry, viewer)
        await registry.cli_json("token", "revoke", "temp")
        await page.goto(other_url + "/console/devices")
        assert page.url.endswith("/login")
    finally:
        await b.stop()
        await context.close()
