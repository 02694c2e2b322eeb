"""A log holding an event the projection cannot apply (written straight into PostgreSQL, as
an attacker with database access or an old bug would): the registry skips it, records a
ProjectionError once, says so in `status`, and keeps working: mutations, iPXE scripts,
rebuilds and restarts."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from services.registry.app import RegistryApp
from tests.boot.test_service import UUID, Boot, boot, seed  # noqa: F401
from tests.registry.conftest import Registry

pytestmark = pytest.mark.timeout(180)
MAC = "52:54:00:12:34:56"
NEVER_REGISTERED = "52:54:00:99:99:99"


async def insert_raw(reg: Registry, type_: str, stream_id: str, data: dict[str, Any]) -> int:
    """One row put into the events table by hand, past every check of the registry."""
    async with reg.app.store.pool.acquire() as conn:
        return int(
            await conn.fetchval(
                "INSERT INTO events (id, stream_id, version, type, time, data) "
                "VALUES ($1, $2, (SELECT coalesce(max(version), 0) + 1 FROM events "
                "WHERE stream_id = $2), $3, $4, $5) RETURNING position",
                *(uuid.uuid4(), stream_id, type_, datetime.now(UTC), json.dumps(data)),
            )
        )


async def test_one_bad_event_does_not_break_the_registry(
    boot: Boot,  # noqa: F811 (the fixture)
    registry: Registry,
) -> None:
    await seed(registry, registry.data_dir, MAC, "win")
    bad = await insert_raw(
        registry, "DeviceRemoved", f"device-{NEVER_REGISTERED}", {"mac": NEVER_REGISTERED}
    )

    # A mutation catches up with the log (the bad event included) and still succeeds.
    async with registry.http() as http:
        r = await http.post("/devices", json={"mac": "52:54:00:00:00:07"})
        assert r.status_code == 201, r.text
    [recorded] = await registry.app.store.read_all(types=["ProjectionError"])
    assert recorded.data["position"] == bad and recorded.data["skipped_type"] == "DeviceRemoved"
    assert recorded.data["event_id"] and "is not registered" in recorded.data["error"]

    # Boots work: the iPXE script hands out the vdisk.
    script = await boot.script(mac=MAC, uuid=UUID)
    assert "sanboot " in script and "error" not in script

    # A rebuild gets past it, equal to the live state, and records it no second time.
    rebuilt = await registry.cli_json("registry", "rebuild")
    assert rebuilt["equal_to_live"] is True and rebuilt["projection_errors"] == 1
    assert len(await registry.app.store.read_all(types=["ProjectionError"])) == 1

    # A restarted registry builds its projection past it too.
    again = RegistryApp(registry.app.store, registry.settings)
    await again.start()
    assert again.projection.devices.keys() == registry.app.projection.devices.keys()
    assert again.projection_errors()["count"] == 1
    assert len(await registry.app.store.read_all(types=["ProjectionError"])) == 1

    # `streamboot status` says so (from the registry's heartbeat).
    for _ in range(100):
        _, out, _ = await registry.cli("status", "--json")
        [reg] = [b for b in json.loads(out)["instances"] if b["service"] == "registry"]
        if reg.get("projection_errors", {}).get("count") == 1:
            break
        await asyncio.sleep(0.1)
    assert reg["projection_errors"]["last"]["position"] == bad
    _, out, _ = await registry.cli("status")
    assert "1 event(s) of the log skipped" in out and "DeviceRemoved" in out
