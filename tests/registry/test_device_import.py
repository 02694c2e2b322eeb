"""Many devices at once through the real CLI against the real registry: a CSV import is
every row or none (each bad row named by its line), and collections are created, listed
and assigned."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry.conftest import Registry, write_image

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
GOOD = """\
# the lab's machines
MAC,Hostname,Collection,Tester,Kernel_Args,UUID,vdisks
52:54:00:10:00:01,lab-001,lab,yes,console=ttyS0,4C4C4544-0000-1000-8000-000000000001,demo
52-54-00-10-00-02,lab-002,lab,no,,,

"52:54:00:10:00:03",lab-003,,,,,demo other
"""


async def demo_vdisks(registry: Registry, data_dir: Path, *names: str) -> None:
    for name in names:
        image = write_image(data_dir / f"{name}.raw", 2 * MiB, {0: b"MBR"})
        await registry.cli_json("vdisk", "import", str(image), "--name", name)


async def test_a_csv_imports_every_row_with_its_vdisks(registry: Registry, data_dir: Path) -> None:
    await demo_vdisks(registry, data_dir, "demo", "other")
    csv_file = data_dir / "lab.csv"
    csv_file.write_text(GOOD)
    out = await registry.cli_json("device", "import", str(csv_file))
    assert out["imported"] == 3 and out["assigned"] == 2
    one = registry.app.show_device("52:54:00:10:00:01")
    assert one["hostname"] == "lab-001" and one["tester"] and one["collection"] == "lab"
    assert one["kernel_args"] == "console=ttyS0"
    assert one["smbios_uuid"] == "4c4c4544-0000-1000-8000-000000000001"
    assert one["assignment"]["default"] == "demo"
    two = registry.app.show_device("52:54:00:10:00:02")
    assert not two["tester"] and two["assignment"]["vdisks"] == []
    three = registry.app.show_device("52:54:00:10:00:03")
    assert three["assignment"] == {
        "vdisks": ["demo", "other"],
        "default": "demo",
        "source": "device",
    }
    # The human view says what happened.
    code, text, _ = await registry.cli("device", "list")
    assert code == 0 and "lab-003" in text


async def test_a_bad_row_imports_nothing_and_each_is_named(
    registry: Registry, data_dir: Path
) -> None:
    await demo_vdisks(registry, data_dir, "demo")
    await registry.cli_json("device", "add", "52:54:00:10:00:09", "--hostname", "taken")
    bad = data_dir / "bad.csv"
    bad.write_text(
        "mac,hostname,vdisks\n"
        "52:54:00:10:00:01,fine-1,demo\n"  # line 2: good
        "52:54:00:zz:00:02,fine-2,\n"  # line 3: not a MAC
        "52:54:00:10:00:04,taken,\n"  # line 4: hostname of a registered device
        "52:54:00:10:00:05,fine-1,\n"  # line 5: hostname of line 2
        "52:54:00:10:00:06,fine-6,nope\n"  # line 6: no such vdisk
        "52:54:00:10:00:07,fine-7\n"  # line 7: a field short
        "52:54:00:10:00:09,again,\n"  # line 8: MAC already registered
    )
    before = dict(registry.app.projection.devices)
    code, out, err = await registry.cli("device", "import", str(bad))
    assert code == 1, (out, err)
    assert "6 of 7 row(s) refused, nothing imported" in err
    for line, words in {
        3: "invalid MAC",
        4: "'taken' is already used",
        5: "on line 2 of this file",
        6: "no vdisk named 'nope'",
        7: "2 fields where the header has 3",
        8: "already exists",
    }.items():
        assert f"line {line}: " in err and words in err, (line, err)
    assert "line 2:" not in err.replace("on line 2", "")
    assert registry.app.projection.devices == before
    # The API answers the same per row, for the console.
    async with registry.http() as http:
        r = await http.post("/devices/import", json={"csv": bad.read_text()})
    assert r.status_code == 400
    assert [row["line"] for row in r.json()["rows"]] == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "no header row"),
        ("hostname,collection\nlab-1,lab\n", "no 'mac' column"),
        ("mac,colour\n52:54:00:10:00:01,red\n", "unknown column(s) 'colour'"),
        ("mac,hostname\n", "no rows"),
    ],
)
async def test_a_file_that_is_not_a_device_list_is_refused(
    registry: Registry, data_dir: Path, text: str, words: str
) -> None:
    f = data_dir / "x.csv"
    f.write_text(text)
    code, _, err = await registry.cli("device", "import", str(f))
    assert code == 1 and words in err, err
    assert registry.app.projection.devices == {}


async def test_collections_are_created_listed_and_assigned(
    registry: Registry, data_dir: Path
) -> None:
    await demo_vdisks(registry, data_dir, "demo")
    for n in (1, 2):
        await registry.cli_json("device", "add", f"52:54:00:10:00:0{n}", "--hostname", f"pc-{n}")
    made = await registry.cli_json(
        "collection", "create", "lab", "--device", "52:54:00:10:00:01",
        "--device", "52:54:00:10:00:02", "--vdisk", "demo",
    )  # fmt: skip
    assert made["vdisks"] == ["demo"] and made["default"] == "demo"
    assert [d["hostname"] for d in made["devices"]] == ["pc-1", "pc-2"]
    a = registry.app.show_device("52:54:00:10:00:02")["assignment"]
    assert a["default"] == "demo" and a["source"] == "collection lab"
    listed = await registry.cli_json("collection", "list")
    assert [c["name"] for c in listed] == ["lab"]
    code, text, _ = await registry.cli("collection", "list")
    assert code == 0 and "lab" in text and "demo (default)" in text
    # Neither devices nor a vdisk: nothing to create.
    code, _, err = await registry.cli("collection", "create", "empty")
    assert code == 1 and "give it devices and/or a vdisk" in err
    # An unknown device refuses the whole request.
    code, _, err = await registry.cli(
        "collection", "create", "lab2", "--device", "52:54:00:10:00:01",
        "--device", "52:54:00:10:00:0f",
    )  # fmt: skip
    assert code == 1 and "no device with MAC 52:54:00:10:00:0f" in err
    assert registry.app.show_device("52:54:00:10:00:01")["collection"] == "lab"
