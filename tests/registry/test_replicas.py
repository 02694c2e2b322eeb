"""Two registry replicas on one event log: decisions stay unique across them, and each sees
the other's appends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.registry.app import RegistryApp
from services.registry.domain.errors import DomainError
from shared.event_store import EventStore
from shared.settings import Settings
from tests.registry.conftest import PATIENT

pytestmark = pytest.mark.timeout(120)
MAC = "52:54:00:00:00:01"


async def test_concurrent_opens_across_replicas(database_url: str, data_dir: Path) -> None:
    stores = [await EventStore.connect(database_url) for _ in range(2)]
    try:
        settings = Settings(data_dir=data_dir, **PATIENT)
        a, b = (RegistryApp(s, settings) for s in stores)
        await a.start()
        await b.start()
        # A vdisk registered without files: the registry's rules do not read block data.
        root = settings.vdisk_root / "win" / ".staging-0000000000000000"
        root.mkdir(parents=True)
        (root / "v1.raw").write_bytes(bytes(4096))
        await a.publish_version(
            "win", version=1, staging=root.name, layer="win/v1.raw", size=4096,
            checksum="sha256:0", changed_blocks=1, block_size=65536,
        )  # fmt: skip
        await b.add_device(MAC, hostname="pc1")  # b decides on a's vdisk: it caught up
        await a.assign("device", MAC, "win")
        with pytest.raises(DomainError, match="hostname 'pc1' is already used"):
            await a.add_device("52:54:00:00:00:02", hostname="pc1")

        async def attempt(app: RegistryApp) -> str:
            try:
                return (await app.open_session(MAC))["session_id"]
            except DomainError as exc:
                assert exc.kind == "conflict"
                return "conflict"

        results = await asyncio.gather(*(attempt((a, b)[i % 2]) for i in range(20)))
        winners = [r for r in results if r != "conflict"]
        assert len(winners) == 1
        rejected = await stores[0].read_all(types=["SessionConflictRejected"])
        assert len(rejected) == 19
        # Each replica resolves the other's session.
        await a.catch_up()
        await b.catch_up()
        assert a.projection.snapshot() == b.projection.snapshot()
    finally:
        for s in stores:
            await s.close()
