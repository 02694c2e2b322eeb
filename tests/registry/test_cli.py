"""The CLI verbs end to end: the real `streamboot` command against the real registry (REST),
real images through qemu-img, and the bad inputs of issue 3 (clear error, non-zero exit,
nothing half-written)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.registry.app import RegistryApp
from shared import vdisk_store
from shared.settings import Settings
from shared.vdisk_layout import open_chain
from tests.registry.conftest import INITRD, KERNEL, Registry, write_bootable_image, write_image

pytestmark = pytest.mark.timeout(180)
A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"
MiB = 1 << 20


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def chain_bytes(layers: list[str], size: int) -> bytes:
    with open_chain(layers) as chain:
        return chain.pread(0, size)


def to_qcow2(raw: Path, out: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)


def store_files(reg: Registry) -> list[str]:
    root = reg.settings.vdisk_root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


async def test_rest_needs_the_bearer_token(registry: Registry) -> None:
    async with registry.http(token=None) as anon, registry.http(token="wrong") as wrong:
        assert (await anon.get("/health")).status_code == 200
        for client in (anon, wrong):
            r = await client.get("/devices")
            assert r.status_code == 401 and "token" in r.json()["error"]
            assert (await client.post("/sessions", json={"mac": A})).status_code == 401
        assert "/devices" in (await anon.get("/openapi.json")).json()["paths"]
    async with registry.http() as ok:
        assert (await ok.get("/devices")).json() == []


async def test_devices_verbs(registry: Registry) -> None:
    d = await registry.cli_json(
        "device", "add", A.upper(), "--hostname", "pc-a", "--uuid",
        "4C4C4544-0000-1000-8000-00000000000A", "--collection", "lab", "--tester",
    )  # fmt: skip
    assert d["mac"] == A and d["hostname"] == "pc-a" and d["tester"] and d["collection"] == "lab"
    assert len(d["machine_id"]) == 32
    assert d["smbios_uuid"] == "4c4c4544-0000-1000-8000-00000000000a"
    code, out, _ = await registry.cli("device", "list")
    assert code == 0 and "pc-a" in out
    assert (await registry.cli_json("device", "show", A))["hostname"] == "pc-a"
    assert (await registry.cli_json("device", "disable", A))["enabled"] is False
    assert (await registry.cli_json("device", "enable", A))["enabled"] is True
    assert (await registry.cli_json("device", "remove", A)) == {"removed": A}
    assert await registry.cli_json("device", "list") == []


async def test_import_versions_promote_rollback(registry: Registry, data_dir: Path) -> None:
    size = 8 * MiB
    v1 = write_image(data_dir / "v1.raw", size, {0: b"MBR", 3 * MiB: b"one"})
    r = await registry.cli_json("vdisk", "import", str(v1), "--name", "win")
    assert r["version"]["version"] == 1 and r["version"]["stage"] == "production"
    assert r["size"] == size and r["version"]["checksum"] == sha256(v1)
    # v2 from a qcow2 image: stored as a delta of the changed blocks only.
    v2raw = write_image(data_dir / "v2.raw", size, {0: b"MBR", 3 * MiB: b"two", 5 * MiB: b"new"})
    v2 = data_dir / "v2.qcow2"
    to_qcow2(v2raw, v2)
    r = await registry.cli_json("vdisk", "import", str(v2), "--name", "win")
    ver = r["version"]
    assert ver["version"] == 2 and ver["stage"] == "maintenance" and ver["parent"] == 1
    assert ver["changed_blocks"] == 2 and ver["checksum"] == sha256(v2raw)
    assert chain_bytes(r["latest_layers"], size) == v2raw.read_bytes()
    assert store_files(registry) == ["win", "win/v1.raw", "win/v2.data", "win/v2.map"]

    await registry.cli_json("device", "add", A, "--tester")
    await registry.cli_json("device", "add", B)
    for mac in (A, B):
        code, _, err = await registry.cli("assign", mac, "win", "--default")
        assert code == 0, err
    # Maintenance: nobody boots v2 but a maintenance session.
    s_b1 = await registry.cli_json("session", "open", B)
    assert s_b1["version"] == 1
    vs = await registry.cli_json("vdisk", "promote", "win", "2", "--to", "test")
    assert vs["production_version"] == 1
    s_a = await registry.cli_json("session", "open", A)
    assert s_a["version"] == 2  # the tester boots the test version
    await registry.cli_json("vdisk", "promote", "win", "2", "--to", "production")
    # B keeps running on v1 until its next boot.
    resolved = await registry.app.resolve(s_b1["token"])
    assert resolved["version"] == 1 and len(resolved["layers"]) == 1
    await registry.cli_json("session", "close", s_b1["token"])
    s_b2 = await registry.cli_json("session", "open", B)
    assert s_b2["version"] == 2
    assert (await registry.app.resolve(s_b2["token"]))["layers"][-1].endswith("win/v2.map")
    await registry.cli_json("session", "close", s_b2["session_id"])
    r = await registry.cli_json("vdisk", "rollback", "win")
    assert r["production_version"] == 1
    versions = await registry.cli_json("vdisk", "versions", "win")
    assert [(v["version"], v["current_production"], v["withdrawn"]) for v in versions] == [
        (1, True, False),
        (2, False, True),
    ]
    assert (await registry.cli_json("session", "open", B))["version"] == 1
    listed = await registry.cli_json("session", "list")
    assert sorted(s["mac"] for s in listed) == [A, B]
    assert all("token" not in s and "token_hash" not in s for s in listed)


async def test_session_open_json_contract(registry: Registry, data_dir: Path) -> None:
    await registry.cli_json(
        "vdisk", "import", str(write_image(data_dir / "i.raw", MiB, {})), "--name", "img"
    )
    await registry.cli_json("device", "add", A)
    await registry.cli_json("assign", A, "img")
    await registry.cli_json(
        "vdisk", "set", "img", "--write-cache", "client-disk", "--persistence", "keep"
    )
    s = await registry.cli_json("session", "open", A, "--vdisk", "img")
    for key in ("token", "nbd_uri", "http_url", "vdisk", "version", "session_id", "write_cache"):
        assert key in s
    assert s["vdisk"] == "img" and s["version"] == 1
    assert s["write_cache"] == "client-disk" and s["write_cache_persistence"] == "keep"
    assert s["read_only"] is True  # client-side cache: the server export is read-only
    code, _, err = await registry.cli("session", "open", A)
    assert code == 1 and "already has a live session" in err


async def _log_len(reg: Registry) -> int:
    """Events in the log but the audit trail (a refused request is recorded there too)."""
    return sum(e.type != "AdminActionPerformed" for e in await reg.app.store.read_all())


async def test_bad_inputs_fail_clearly_and_write_nothing(
    registry: Registry, data_dir: Path
) -> None:
    await registry.cli_json(
        "vdisk", "import", str(write_image(data_dir / "a.raw", MiB, {0: b"x"})), "--name", "win"
    )
    async with registry.http() as http:
        assert (await http.post("/devices", json={"mac": A, "hostname": "pc-a"})).is_success
        assert (await http.post("/assignments", json={"target": A, "vdisk": "win"})).is_success
        assert (await http.post("/sessions", json={"mac": A})).is_success
    before_log, before_files = await _log_len(registry), store_files(registry)
    text = data_dir / "notes.txt"
    text.write_text("not a disk\n")
    same = write_image(data_dir / "same.raw", MiB, {0: b"x"})
    cases: list[tuple[tuple[str, ...], str]] = [
        (("device", "add", "52:54:00:zz:00:01"), "invalid MAC address"),
        (("device", "add", B, "--hostname", "pc-a"), "hostname 'pc-a' is already used"),
        (("device", "show", B), "no device with MAC"),
        (("assign", A, "nope"), "no vdisk named 'nope'"),
        (("session", "open", A, "--vdisk", "nope"), "no vdisk named 'nope'"),
        (("vdisk", "promote", "nope", "1", "--to", "test"), "no vdisk named 'nope'"),
        (("vdisk", "import", str(data_dir / "missing.raw"), "--name", "x"), "no such file"),
        (("vdisk", "import", str(text), "--name", "x"), "is not a disk image"),
        (("vdisk", "import", str(same), "--name", "win"), "identical to version 1"),
        (("vdisk", "remove", "win"), "in use by 1 live session"),
        (("vdisk", "import", str(same), "--name", "../etc"), "invalid vdisk name"),
        (("session", "close", "no-such-token"), "no live session"),
    ]
    for i, (args, message) in enumerate(cases):
        code, out, err = await registry.cli(*args)
        assert code != 0, args
        assert message in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        if i % 3 == 0:  # --json: the error as JSON too (a sample: each CLI run costs ~1.5 s)
            code, out, _ = await registry.cli(*args, "--json")
            assert code != 0 and message in out
    assert await _log_len(registry) == before_log
    assert store_files(registry) == before_files  # no staging leftovers


async def test_registry_unreachable_is_a_clear_error(data_dir: Path) -> None:
    reg = Registry(Settings(data_dir=data_dir), None, "", data_dir, None)  # type: ignore[arg-type]
    code, _, err = await reg.cli("device", "list")
    assert code == 3 and "not running" in err


async def test_rebuild_equals_live_state(registry: Registry, data_dir: Path) -> None:
    # Setup over REST (each CLI run costs a Python start); the rebuild itself by the CLI.
    img = write_image(data_dir / "r1.raw", 2 * MiB, {0: b"a"})
    await registry.cli_json("vdisk", "import", str(img), "--name", "r")
    await registry.cli_json(
        "vdisk", "import", str(write_image(data_dir / "r2.raw", 2 * MiB, {0: b"b"})), "--name", "r"
    )
    await registry.cli_json("vdisk", "import", str(img), "--name", "gone")
    async with registry.http() as http:

        async def call(method: str, path: str, body: Any = None, ok: bool = True) -> Any:
            r = await http.request(method, path, json=body)
            assert r.is_success == ok, r.text
            return r.json()

        await call("POST", "/vdisks/r/promote", {"version": 2, "to": "production"})
        await call("POST", "/vdisks/r/rollback")
        await call("PATCH", "/vdisks/r", {"mode": "private"})
        await call("POST", "/devices", {"mac": A, "collection": "lab"})
        await call("POST", "/devices", {"mac": B, "hostname": "b"})
        await call("PATCH", f"/devices/{B}", {"hostname": "bee", "tester": True})
        await call(
            "POST", "/assignments", {"target_kind": "collection", "target": "lab", "vdisk": "r"}
        )
        await call("POST", "/assignments", {"target": B, "vdisk": "gone"})
        await call("DELETE", "/vdisks/gone")
        s = await call("POST", "/sessions", {"mac": A})
        await call("POST", "/sessions", {"mac": A}, ok=False)  # a conflict, in the log too
        await call("DELETE", f"/sessions/{s['token']}")
        await call("POST", "/sessions", {"mac": A})
        await call("POST", f"/devices/{B}/disable")
    live: dict[str, Any] = registry.app.projection.snapshot()
    r = await registry.cli_json("registry", "rebuild")
    assert r["equal_to_live"] is True and r["position"] == live["position"]
    # The one event since is the rebuild's own audit record (AdminActionPerformed).
    # (Positions may have holes: a group commit that appends nothing leaves one.)
    after = registry.app.projection.snapshot()
    [since] = await registry.app.store.read_all(after_position=live["position"])
    assert since.type == "AdminActionPerformed" and since.data["path"] == "/registry/rebuild"
    assert after["position"] == since.position
    audit = ("position", "api_token_last_action")
    assert {k: v for k, v in after.items() if k not in audit} == {
        k: v for k, v in live.items() if k not in audit
    }
    live = after
    # And a registry started from scratch on the same log sees the same state.
    fresh = RegistryApp(registry.app.store, registry.settings)
    await fresh.start()
    assert fresh.projection.snapshot() == live
    assert live["assignments"] == {"collection:lab": {"vdisks": ["r"], "default": "r"}}
    assert live["devices"][B]["hostname"] == "bee" and not live["devices"][B]["enabled"]
    assert "gone" not in live["vdisks"] and len(live["sessions"]) == 1


async def test_import_finds_the_kernel_or_says_why_it_boots_by_sanboot(
    registry: Registry, data_dir: Path
) -> None:
    image = write_bootable_image(data_dir / "deb.raw")
    code, out, err = await registry.cli("vdisk", "import", str(image), "--name", "deb")
    assert code == 0, err
    assert "version 1: boots kernel-direct: kernel 6.1.0-12-amd64" in out, out
    boot = registry.app.vdisk_root / "deb" / "boot" / "v1"
    assert (boot / "vmlinuz").read_bytes() == KERNEL and (boot / "initrd").read_bytes() == INITRD
    [found] = await registry.app.store.read_all(types=["BootFilesScanned"])
    assert found.data["kernel_sha256"] == hashlib.sha256(KERNEL).hexdigest()
    assert found.data["initrd_size"] == len(INITRD) and found.data["chosen_by"] == "newest"
    assert found.data["root"].startswith("UUID=") and found.data["problem"] is None

    # A new version without any filesystem: published all the same, to boot by sanboot.
    blank = write_image(data_dir / "blank.raw", image.stat().st_size, {0: b"nothing"})
    code, out, err = await registry.cli("vdisk", "import", str(blank), "--name", "deb")
    assert code == 0, err
    assert "version 2: boots by sanboot (the image's own bootloader): no ext2/3/4" in out, out
    assert not (registry.app.vdisk_root / "deb" / "boot" / "v2").exists()
    code, out, _ = await registry.cli("vdisk", "show", "deb")
    assert "version 1: boots kernel-direct" in out and "version 2: boots by sanboot" in out

    # A claim of boot files the staging dir does not hold: refused, nothing half-published.
    staged = vdisk_store.stage_version(
        registry.app.vdisk_root, "deb", image, 3, [Path(p) for p in
        registry.app.vdisk_view("deb")["latest_layers"]],
    )  # fmt: skip
    shutil.rmtree(registry.app.vdisk_root / "deb" / staged.staging / "boot")
    async with registry.http() as http:
        r = await http.post("/vdisks/deb/versions", json={
            "version": 3, "staging": staged.staging, "layer": staged.layer, "size": staged.size,
            "checksum": staged.checksum, "changed_blocks": staged.changed_blocks,
            "block_size": staged.block_size, "boot": staged.boot,
        })  # fmt: skip
    assert r.status_code == 400 and "lacks its boot file" in r.json()["error"]
    assert registry.app.vdisk_view("deb")["latest_version"] == 2
    assert not (registry.app.vdisk_root / "deb" / staged.staging).exists()
    assert not (registry.app.vdisk_root / "deb" / "boot" / "v3").exists()
