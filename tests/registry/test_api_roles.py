"""Admin API roles through the real registry and the real `streamboot` CLI: named tokens of
a role (admin, operator, viewer), 403 for a role that may not, 401 for a revoked token,
and the audit trail naming the token of every mutating request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.registry.conftest import Registry, write_image

pytestmark = pytest.mark.timeout(180)
A = "52:54:00:00:00:2a"
B = "52:54:00:00:00:2b"
MiB = 1 << 20


async def create_token(registry: Registry, name: str, role: str) -> str:
    code, out, err = await registry.cli("token", "create", "--name", name, "--role", role)
    assert code == 0, err
    assert "shown once" in err
    token = out.strip()
    assert len(token) >= 43 and "\n" not in token
    return token


async def log_json(registry: Registry, *args: str) -> str:
    """`streamboot events list --json ARGS`: the log as the CLI shows it."""
    env = {"STREAMBOOT_DATABASE_URL": str(registry.settings.database_url)}
    code, out, err = await registry.cli("events", "list", "--json", *args, env=env)
    assert code == 0, err
    return out


async def audit_events(registry: Registry) -> list[dict[str, Any]]:
    out = await log_json(registry, "--type", "AdminActionPerformed")
    return [json.loads(line)["data"] for line in out.splitlines()]


async def test_viewer_reads_and_is_refused_every_change(registry: Registry) -> None:
    viewer = await create_token(registry, "dashboard", "viewer")
    async with registry.http(viewer) as v:
        assert (await v.get("/devices")).status_code == 200
        assert (await v.get("/sessions")).status_code == 200
        assert (await v.get("/registry/status")).status_code == 200
        r = await v.post("/devices", json={"mac": A})
        assert r.status_code == 403
        assert r.json() == {
            "error": "token 'dashboard' has role viewer; POST /devices needs operator or above",
            "kind": "forbidden",
        }
        for method, path in [
            ("DELETE", f"/devices/{A}"),
            ("POST", "/assignments"),
            ("POST", "/sessions"),
            ("POST", "/vdisks/win/promote"),
            ("POST", "/registry/rebuild"),
            ("GET", "/tokens"),
            ("POST", "/tokens"),
        ]:
            assert (await v.request(method, path, json={})).status_code == 403, (method, path)
    assert registry.app.projection.devices == {}
    # Through the CLI too: a clear one-line error, exit 1.
    code, _, err = await registry.cli("device", "add", A, env={"STREAMBOOT_API_TOKEN": viewer})
    assert code == 1 and "role viewer" in err and "needs operator" in err
    code, _, _ = await registry.cli("device", "list", env={"STREAMBOOT_API_TOKEN": viewer})
    assert code == 0


async def test_operator_changes_devices_but_not_vdisks(registry: Registry, data_dir: Path) -> None:
    # A vdisk for the operator to assign, imported by the built-in admin (data dir's token).
    image = write_image(data_dir / "v1.raw", 4 * MiB, {0: b"MBR"})
    await registry.cli_json("vdisk", "import", str(image), "--name", "win")
    operator = await create_token(registry, "helpdesk", "operator")
    as_op = {"STREAMBOOT_API_TOKEN": operator}

    code, out, err = await registry.cli(
        "device", "add", A, "--hostname", "pc-a", "--json", env=as_op
    )
    assert code == 0, err
    assert json.loads(out)["hostname"] == "pc-a"
    code, _, err = await registry.cli("assign", A, "win", "--default", env=as_op)
    assert code == 0, err
    code, out, err = await registry.cli("session", "open", A, "--json", env=as_op)
    assert code == 0, err
    sid = json.loads(out)["session_id"]
    code, _, err = await registry.cli("session", "close", sid, env=as_op)
    assert code == 0, err

    # Not the vdisks: importing a version, promoting, removing are admin's.
    image2 = write_image(data_dir / "v2.raw", 4 * MiB, {0: b"MBR", MiB: b"two"})
    code, _, err = await registry.cli("vdisk", "import", str(image2), "--name", "win", env=as_op)
    assert code == 1 and "role operator" in err and "needs admin" in err
    code, _, err = await registry.cli("vdisk", "promote", "win", "1", "--to", "test", env=as_op)
    assert code == 1 and "needs admin" in err
    assert sorted(registry.app.projection.vdisks["win"]["versions"]) == [1]
    # The refused import left no staging dir behind in the store.
    assert [
        p.name for p in (registry.settings.vdisk_root / "win").iterdir() if "staging" in p.name
    ] == []
    # Nor the tokens.
    code, _, err = await registry.cli(
        "token", "create", "--name", "x", "--role", "admin", env=as_op
    )
    assert code == 1 and "needs admin" in err

    # Every change and every refusal is in the log, naming the token and its role.
    audit = await audit_events(registry)
    mine = [
        (a["method"], a["path"], a["status"], a["outcome"])
        for a in audit
        if a["token_name"] == "helpdesk"
    ]
    assert ("POST", "/devices", 201, "done") in mine
    assert ("POST", "/assignments", 200, "done") in mine
    assert ("POST", "/sessions", 201, "done") in mine
    assert ("DELETE", f"/sessions/{sid}", 200, "done") in mine
    assert ("POST", "/vdisks/win/versions", 403, "refused") in mine
    assert ("POST", "/vdisks/win/promote", 403, "refused") in mine
    assert all(a["role"] == "operator" for a in audit if a["token_name"] == "helpdesk")
    admin = [a for a in audit if a["token_name"] == "bootstrap-admin"]
    assert [(a["method"], a["path"], a["status"]) for a in admin] == [
        ("POST", "/vdisks/win/versions", 201),
        ("POST", "/tokens", 201),
    ]


async def test_revoked_token_is_refused_and_names_are_never_reused(registry: Registry) -> None:
    token = await create_token(registry, "ci-bot", "operator")
    async with registry.http(token) as bot:
        assert (await bot.post("/devices", json={"mac": A})).status_code == 201
        code, out, err = await registry.cli("token", "revoke", "ci-bot")
        assert code == 0 and "revoked API token ci-bot" in out, err
        r = await bot.post("/devices", json={"mac": B})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "revoked" in r.json()["error"]
        assert (await bot.get("/devices")).status_code == 401
    assert B not in registry.app.projection.devices
    # A revoked name stays taken: the audit trail names one token per name.
    code, _, err = await registry.cli("token", "create", "--name", "ci-bot", "--role", "viewer")
    assert code == 1 and "was revoked" in err
    code, _, err = await registry.cli("token", "revoke", "ci-bot")
    assert code == 1 and "already revoked" in err
    code, _, err = await registry.cli("token", "revoke", "bootstrap-admin")
    assert code == 1 and "api-token" in err
    code, _, err = await registry.cli("token", "create", "--name", "x", "--role", "root")
    assert code == 1 and "role" in err

    listed = {t["name"]: t for t in await registry.cli_json("token", "list")}
    assert set(listed) == {"bootstrap-admin", "ci-bot"}
    bot_row = listed["ci-bot"]
    assert bot_row["role"] == "operator" and bot_row["created_by"] == "bootstrap-admin"
    assert bot_row["revoked_at"] and bot_row["last_action_at"]
    assert "token" not in bot_row and "token_hash" not in bot_row
    code, out, _ = await registry.cli("token", "list")
    assert code == 0 and "ci-bot" in out and "operator" in out

    # The log holds the token's hash, never the token; a rebuild agrees with the live state.
    out = await log_json(registry)
    assert token not in out and "ApiTokenCreated" in out
    async with registry.http() as admin:
        assert (await admin.post("/registry/rebuild")).json()["equal_to_live"] is True


async def test_audit_masks_a_session_token_in_the_path(registry: Registry, data_dir: Path) -> None:
    image = write_image(data_dir / "v1.raw", 4 * MiB, {0: b"MBR"})
    await registry.cli_json("vdisk", "import", str(image), "--name", "win")
    await registry.cli_json("device", "add", A)
    await registry.cli_json("assign", A, "win")
    opened = await registry.cli_json("session", "open", A)
    await registry.cli_json("session", "close", opened["token"])
    paths = [a["path"] for a in await audit_events(registry)]
    assert "/sessions/<token>" in paths
    assert opened["token"] not in await log_json(registry)
