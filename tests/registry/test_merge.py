"""`streamboot vdisk merge`: a chain of real versions written out as one base layer, block
for block the same (sha256 through the chain, and through a real NBD client, nbdcopy, of
a session on the real stream node), while that session, opened before the merge, keeps
reading its old layers; those are removed only once it has closed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.registry import merge as merge_store
from shared.vdisk_layout import open_chain
from tests.registry.conftest import Registry, write_image
from tests.registry.test_maintenance import service, service_env

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy (libnbd-bin) missing"),
]
MAC = "52:54:00:00:0b:01"
MiB = 1 << 20
SIZE = 16 * MiB


def chain_sha256(layers: list[str]) -> str:
    digest = hashlib.sha256()
    with open_chain(layers) as chain:
        for offset in range(0, chain.size, MiB):
            digest.update(chain.pread(offset, min(MiB, chain.size - offset)))
    return digest.hexdigest()


async def nbd_sha256(uri: str, out: Path) -> str:
    """The whole export read by nbdcopy (a real NBD client), hashed."""
    proc = await asyncio.create_subprocess_exec(
        "nbdcopy", uri, str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    text, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, text.decode()
    data = await asyncio.to_thread(out.read_bytes)
    await asyncio.to_thread(out.unlink)
    return hashlib.sha256(data).hexdigest()


async def new_version(reg: Registry, image: Path, rng: random.Random, stage: str) -> Any:
    """Change some blocks of the image (random data, and a run zeroed) and import it."""
    await asyncio.to_thread(change_blocks, image, rng)
    return await reg.cli_json("vdisk", "import", str(image), "--name", "os", "--stage", stage)


def change_blocks(image: Path, rng: random.Random) -> None:
    with open(image, "r+b") as f:
        for _ in range(6):
            f.seek(rng.randrange(0, SIZE - 70_000))
            f.write(rng.randbytes(rng.randrange(1, 70_000)))
        f.seek(rng.randrange(0, SIZE - 200_000))
        f.write(bytes(150_000))


async def removed_in_time(reg: Registry) -> list[str]:
    for _ in range(100):
        removed = await reg.app.sweep_layers()
        if removed:
            return removed
        await asyncio.sleep(0.2)
    return []


def files_of(reg: Registry, layers: list[str]) -> list[Path]:
    return merge_store.layer_files(reg.app.vdisk_root, "os", layers)


async def test_merge_keeps_every_block_and_sessions_on_the_old_chain(
    registry: Registry, nc: Any
) -> None:
    dd = registry.data_dir
    rng = random.Random(24)
    image = write_image(dd / "os.raw", SIZE, {i * MiB: rng.randbytes(300_000) for i in range(16)})
    await registry.cli_json("vdisk", "import", str(image), "--name", "os")
    code, _, err = await registry.cli("vdisk", "merge", "os")
    assert code == 1 and "nothing to merge" in err  # one layer
    for _ in range(3):
        await new_version(registry, image, rng, "production")
    shown = await registry.cli_json("vdisk", "show", "os")
    assert shown["latest_version"] == 4 and shown["chain_length"] == 4
    old_layers = shown["latest_layers"]
    v4_layers = list(registry.app.projection.vdisks["os"]["versions"][4]["layers"])
    assert v4_layers == ["os/v1.raw", "os/v2.map", "os/v3.map", "os/v4.map"]
    want = chain_sha256(old_layers)
    assert want == hashlib.sha256(image.read_bytes()).hexdigest()

    node = f"stream-merge-{os.getpid()}"
    env = service_env(registry, node, stream_use_cache="false")
    async with (
        registry.http() as http,
        service("stream", {**env, **registry.bus.env("stream")}, dd / "stream.log"),
    ):
        await registry.sees("stream", node, timeout_s=20.0)
        assert (await http.post("/devices", json={"mac": MAC})).status_code == 201
        assert (await http.post("/assignments", json={"target": MAC, "vdisk": "os"})).is_success
        r = await http.post("/sessions", json={"mac": MAC})
        assert r.status_code == 201, r.text
        s = r.json()
        assert s["version"] == 4
        assert await nbd_sha256(s["nbd_uri"], dd / "read.raw") == want

        # The session reads the whole image again and again while the merge runs.
        merged = asyncio.Event()
        reads: list[str] = []

        async def keep_reading() -> None:
            while not merged.is_set():
                reads.append(await nbd_sha256(s["nbd_uri"], dd / "during.raw"))

        reader = asyncio.create_task(keep_reading())
        done = await registry.cli_json("vdisk", "merge", "os")
        merged.set()
        await reader
        assert reads and set(reads) == {want}
        assert done["merged_upto"] == 4 and done["latest_layers"][0].endswith("/v4.base.raw")
        assert done["chain_length"] == 1 and done["retired_versions"] == [1, 2, 3]
        assert chain_sha256(done["latest_layers"]) == want
        superseded = done["superseded_layers"]
        assert superseded == v4_layers
        assert all(f.exists() for f in files_of(registry, superseded))

        # Still live: the sweep keeps its layers, and it reads on from them.
        assert await registry.app.sweep_layers() == []
        assert all(f.exists() for f in files_of(registry, superseded))
        assert await nbd_sha256(s["nbd_uri"], dd / "after.raw") == want
        # A session opened now reads the new base.
        r = await http.delete(f"/sessions/{s['token']}")
        assert r.is_success, r.text

    # Closed: nothing reads the old layers any more (a cache node of an earlier test may
    # still look alive for a heartbeat timeout: its write caches are unknown till then).
    assert sorted(await removed_in_time(registry)) == sorted(superseded)
    assert not any(f.exists() for f in files_of(registry, superseded))
    shown = await registry.cli_json("vdisk", "show", "os")
    assert shown["superseded_layers"] == [] and shown["layers_bytes"] > 0
    removed = await registry.app.store.read_all(types=["VdiskLayersRemoved"])
    assert [sorted(e.data["layers"]) for e in removed] == [sorted(superseded)]

    # Retired versions cannot come back.
    code, _, err = await registry.cli("vdisk", "rollback", "os")
    assert code == 1 and "was merged into a later version's base" in err
    code, _, err = await registry.cli("vdisk", "promote", "os", "2", "--to", "test")
    assert code == 1 and "merged away" in err
    code, _, err = await registry.cli("vdisk", "merge", "os")
    assert code == 1 and "nothing to merge" in err

    # Later versions stack on the base; a version newer than production is not merged.
    await new_version(registry, image, rng, "production")
    v6 = await new_version(registry, image, rng, "test")
    want6 = chain_sha256(v6["latest_layers"])
    code, _, err = await registry.cli("vdisk", "merge", "os", "--upto", "6")
    assert code == 1 and "would retire production version 5" in err
    # Another merge running (here: its lock held, as another registry would): refused.
    with merge_store.merge_lock(registry.app.vdisk_root, "os"):
        code, _, err = await registry.cli("vdisk", "merge", "os")
        assert code == 1 and "already running" in err
    done = await registry.cli_json("vdisk", "merge", "os")
    assert done["merged_upto"] == 5 and done["chain_length"] == 2  # v6 = base5 + its delta
    assert chain_sha256(done["latest_layers"]) == want6
    assert done["superseded_layers"] == []  # no session: removed at once
    assert not (registry.app.vdisk_root / "os" / "v4.base.raw").exists()

    # The automatic merge, once the production chain passes the setting.
    await new_version(registry, image, rng, "production")
    registry.app.settings.vdisk_auto_merge_layers = 1
    assert await registry.app.auto_merge() == ["os"]
    vd = registry.app.vdisk_view("os")
    assert vd["production_version"] == 7 and vd["production_chain_length"] == 1
    assert chain_sha256(vd["latest_layers"]) == hashlib.sha256(image.read_bytes()).hexdigest()
    assert await registry.app.auto_merge() == []

    merges = await registry.app.store.read_all(types=["VdiskChainMerged"])
    assert [e.data["upto"] for e in merges] == [4, 5, 7]
    # The projection folds merges and removals the same way from the whole log.
    assert (await registry.app.rebuild())["equal_to_live"]


async def test_a_kept_write_cache_of_a_retired_version_keeps_the_old_layers(
    registry: Registry, nc: Any
) -> None:
    """A device's kept write cache is its writes over its version's layers: while a cache
    node holds one of a version the merge retired, the layers it was written over stay."""
    dd = registry.data_dir
    rng = random.Random(7)
    image = write_image(dd / "os.raw", SIZE, {i * MiB: rng.randbytes(100_000) for i in range(16)})
    await registry.cli_json("vdisk", "import", str(image), "--name", "os", "--persistence", "keep")
    await new_version(registry, image, rng, "production")
    node = f"stream-merge-kept-{os.getpid()}"
    env = service_env(registry, node)
    async with (
        registry.http() as http,
        service("cache", {**env, **registry.bus.env("cache")}, dd / "cache.log"),
        service("stream", {**env, **registry.bus.env("stream")}, dd / "stream.log"),
    ):
        await registry.sees("cache", node, timeout_s=20.0)
        await registry.sees("stream", node, timeout_s=20.0)
        assert (await http.post("/devices", json={"mac": MAC})).status_code == 201
        assert (await http.post("/assignments", json={"target": MAC, "vdisk": "os"})).is_success
        s = (await http.post("/sessions", json={"mac": MAC})).json()
        assert s["version"] == 2 and s["write_cache_persistence"] == "keep"
        qemu_io = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", s["nbd_uri"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(qemu_io.communicate(), 60)
        assert qemu_io.returncode == 0, out.decode()
        assert (await http.delete(f"/sessions/{s['token']}")).is_success
        await new_version(registry, image, rng, "production")
        done = await registry.cli_json("vdisk", "merge", "os")
        assert done["merged_upto"] == 3 and done["retired_versions"] == [1, 2]
        # No live session, but the cache node keeps the closed session's writes over v2.
        superseded = done["superseded_layers"]
        assert superseded == ["os/v1.raw", "os/v2.map", "os/v3.map"]
        assert await registry.app.sweep_layers() == []
        assert all(f.exists() for f in files_of(registry, superseded))
        caches, complete = await registry.app._write_caches()  # type: ignore[misc]
        assert complete and any(c["vdisk"] == "os" and c["version"] == 2 for c in caches)
