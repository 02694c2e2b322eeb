"""A collection is deleted or renamed through the real CLI and REST. Deleting is refused,
naming its devices, while devices are in it; with --release-devices they leave it (and
stay registered) and its vdisks are unassigned; refused while it holds CHAP credentials.
Renaming moves its devices and vdisks; refused onto an existing name or with CHAP."""

from __future__ import annotations

import asyncio

import pytest

from shared import vdisk_store
from streamboot.commands.vdisk import register
from streamboot.registry_api import RegistryClient
from tests.registry.conftest import TOKEN, Registry, write_image

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
A, B = "52:54:00:de:00:01", "52:54:00:de:00:02"


async def a_vdisk(registry: Registry, name: str) -> None:
    """A one-version vdisk, staged and handed to the registry as the CLI's import does."""
    image = write_image(registry.data_dir / f"{name}.raw", 2 * MiB, {0: b"MBR"})
    root = registry.app.vdisk_root
    staged = await asyncio.to_thread(vdisk_store.stage_version, root, name, image, 1, [])
    client = RegistryClient(registry.api_url, TOKEN)
    await asyncio.to_thread(register, client, root, staged)


async def test_a_collection_is_deleted_only_when_its_devices_are_let_go(
    registry: Registry,
) -> None:
    app = registry.app
    await a_vdisk(registry, "demo")
    await app.add_device(A, hostname="lab-a", collection="lab")
    await app.add_device(B, hostname="lab-b", collection="lab")
    await app.assign("device", B, "demo")  # B has its own vdisk; A boots only lab's
    await app.assign("collection", "lab", "demo", default=True)

    code, _, err = await registry.cli("collection", "delete", "lab")
    assert code == 1, err
    assert "still has 2 device(s): lab-a, lab-b" in err, err
    assert "1 of them boot only its vdisks and would have none" in err, err
    assert "--release-devices" in err, err
    assert app.show_device(A)["collection"] == "lab"  # nothing changed

    code, out, err = await registry.cli("collection", "delete", "lab", "--release-devices")
    assert code == 0, err
    assert "deleted collection lab: 2 device(s) released, vdisks unassigned: demo" in out, out
    assert [app.show_device(m)["collection"] for m in (A, B)] == [None, None]
    assert app.show_device(A)["assignment"]["vdisks"] == []
    assert app.show_device(B)["assignment"]["default"] == "demo"  # its own stays
    async with registry.http() as http:
        assert (await http.get("/collections")).json() == []
        gone = await http.delete("/collections/lab")
        assert gone.status_code == 404 and "no collection 'lab'" in gone.json()["error"]

        # A collection with CHAP credentials: an admin clears them first.
        await app.update_device(A, collection="secure")
        await app.set_chap("collection", "secure", user="iqn-user", secret="s" * 16)
        refused = await http.delete("/collections/secure?release_devices=true")
        assert refused.status_code == 403 and "--no-chap" in refused.json()["error"]
        await app.clear_chap("collection", "secure")
        deleted = await http.delete("/collections/secure?release_devices=true")
        assert deleted.json() == {"name": "secure", "released": [A], "unassigned": []}
    audit = [e["data"]["path"] for e in await app.events(type_="AdminActionPerformed")]
    assert "/collections/lab" in audit and "/collections/secure" in audit


async def test_a_collection_is_renamed_with_its_devices_and_vdisks(registry: Registry) -> None:
    app = registry.app
    await a_vdisk(registry, "demo")
    await app.add_device(A, hostname="lab-a", collection="lab")
    await app.add_device(B, hostname="lab-b", collection="other")
    await app.assign("collection", "lab", "demo", default=True)

    renamed = await registry.cli_json("collection", "rename", "lab", "room-2")
    assert renamed["name"] == "room-2" and renamed["default"] == "demo"
    assert [d["mac"] for d in renamed["devices"]] == [A]
    assert app.show_device(A)["assignment"]["source"] == "collection room-2"
    async with registry.http() as http:
        names = [c["name"] for c in (await http.get("/collections")).json()]
        assert names == ["other", "room-2"]
        taken = await http.post("/collections/room-2/rename", json={"to": "other"})
        assert taken.status_code == 409 and "exists" in taken.json()["error"]
        bad = await http.post("/collections/room-2/rename", json={"to": "no spaces"})
        assert bad.status_code == 400
        gone = await http.post("/collections/lab/rename", json={"to": "x"})
        assert gone.status_code == 404
        await app.set_chap("collection", "other", user="iqn-user", secret="s" * 16)
        sealed = await http.post("/collections/other/rename", json={"to": "x"})
        assert sealed.status_code == 403 and "sealed to its name" in sealed.json()["error"]
