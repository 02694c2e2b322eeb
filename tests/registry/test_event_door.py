"""The log's door: only an event type's owner may append it, and only well-formed events of
their type get in; a layer outside its vdisk's folder is never read, whoever names it.

The attack of issue 21 item 1, against the real registry, a real stream node (in process,
reading through the registry) and curl: forge a vdisk whose layer is a file outside the
vdisk dir, a device and an assignment, open a session over NATS, read over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.stream.service import start as start_stream
from shared import bus
from shared.contracts.stream import announce_session
from shared.envelope import Envelope
from shared.event_log import EventClient
from shared.event_owners import OWNERS
from shared.event_sink import QueuedEventSink
from shared.events import (
    CATALOG,
    AdminActionPerformed,
    ApiTokenCreated,
    ApiTokenRevoked,
    AssignmentChanged,
    BlocksRequested,
    BootRequested,
    DeviceRegistered,
    SessionAttached,
    VdiskCreated,
    VdiskVersionPublished,
    envelope,
)
from shared.service import ServiceRuntime
from shared.settings import Settings
from tests.conftest import wait_for
from tests.registry.conftest import Registry
from tests.registry.test_poisoned_log import insert_raw

pytestmark = pytest.mark.timeout(120)
MAC = "52:54:00:66:66:66"
SECRET = b"root:$6$not-for-your-eyes$"
SIZE = 1 << 20


@pytest.fixture
async def stream(registry: Registry, nats_url: str) -> AsyncIterator[ServiceRuntime]:
    """The real stream service, in this loop, on the registry's vdisk dir."""
    settings = Settings(
        data_dir=registry.data_dir,
        nats_url=nats_url,
        node_id="stream-door",
        nbd_port=0,
        http_stream_port=0,
        iscsi_port=0,  # not the default port: another server on this machine may hold it
        stream_use_cache=False,
    )
    rt = ServiceRuntime("stream", settings)
    try:
        # Inside: a start that fails half-way leaves no NATS connection reconnecting.
        await rt.connect()
        await start_stream(rt)
        yield rt
    finally:
        await rt.stop()


def secret_file(reg: Registry) -> Path:
    """A file the services can read, outside the vdisk dir (the stand-in for /etc/shadow)."""
    reg.settings.vdisk_root.mkdir(parents=True, exist_ok=True)  # vdisks were imported
    path = reg.data_dir / "shadow"
    path.write_bytes(SECRET + bytes(SIZE - len(SECRET)))
    return path


async def curl_range(url: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-r", "0-63", url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out


def forged_vdisk(layer: str) -> list[Envelope]:
    return [
        envelope(e)
        for e in (
            VdiskCreated(name="evil", size=SIZE),
            VdiskVersionPublished(
                name="evil",
                version=1,
                parent=None,
                stage="production",
                path=layer,
                size=SIZE,
                checksum="sha256:0",
                changed_blocks=0,
                block_size=65536,
            ),
            DeviceRegistered(mac=MAC, machine_id=str(uuid.uuid4()), hostname="mallory"),
            AssignmentChanged(target_kind="device", target=MAC, vdisks=["evil"], default="evil"),
        )
    ]


@pytest.mark.parametrize("layer", ["../../../../../../../../{secret}", "../shadow"])
async def test_forged_vdisk_over_the_bus_is_refused_and_nothing_is_served(
    registry: Registry, stream: ServiceRuntime, nc: Any, layer: str
) -> None:
    secret = secret_file(registry)
    layer = layer.format(secret=str(secret).lstrip("/"))
    refusals = []
    for service in bus.APPENDING_SERVICES:
        try:
            await EventClient(nc, service).append(forged_vdisk(layer), retry_for_s=0)
        except bus.RemoteError as exc:
            refusals.append(exc)
    served = b""
    try:
        s = await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})
        http = stream.vitals()["http_stream"]  # type: ignore[operator]
        served = await curl_range(f"{http}/s/{s['token']}")
    except bus.RemoteError:
        pass
    assert SECRET not in served
    assert [e.kind for e in refusals] == ["forbidden"] * len(bus.APPENDING_SERVICES)
    assert "may not append VdiskCreated: only registry does" in str(refusals[0])
    forged = ["VdiskCreated", "VdiskVersionPublished", "DeviceRegistered", "AssignmentChanged"]
    assert await registry.app.store.read_all(types=forged) == []


async def test_a_forged_announcement_never_reads_outside_the_vdisk_dir(
    registry: Registry, stream: ServiceRuntime, nc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever reaches a stream node's announcement subject cannot make it serve a file
    outside its vdisk dir: the node checks the layers itself."""
    secret = secret_file(registry)
    vdisks = registry.settings.vdisk_root
    (vdisks / "etc").mkdir(parents=True)
    http = stream.vitals()["http_stream"]  # type: ignore[operator]
    for i, (vdisk, layer) in enumerate(
        [
            ("evil", str(secret)),
            ("evil", f"{vdisks}/evil/../../shadow"),
            ("etc", "/etc/shadow"),  # a folder of the vdisk's name, but not in the vdisk dir
        ]
    ):
        token = f"forged-token-{i}-" + "x" * 40
        record = {
            "session_id": str(uuid.uuid4()), "vdisk": vdisk, "version": 1, "size": SIZE,
            "layers": [layer], "write_cache": "server-ram", "store": "local",
        }  # fmt: skip
        await announce_session(nc, "stream-door", token, record)
        await nc.flush()
        await wait_for(lambda i=i: refused(caplog) > i, "the node to refuse the announcement")
        served = await curl_range(f"{http}/s/{token}")
        assert SECRET not in served and not served.startswith(b"root:"), layer
    # A link in a vdisk's folder pointing out of it is refused too.
    (vdisks / "evil").mkdir()
    (vdisks / "evil" / "v1.raw").symlink_to(secret)
    token = "forged-token-link-" + "x" * 40
    record = {
        "session_id": str(uuid.uuid4()), "vdisk": "evil", "version": 1, "size": SIZE,
        "layers": [str(vdisks / "evil" / "v1.raw")], "write_cache": "server-ram",
    }  # fmt: skip
    await announce_session(nc, "stream-door", token, record)
    await nc.flush()
    await wait_for(lambda: refused(caplog) > 3, "the node to refuse the announcement")
    assert SECRET not in await curl_range(f"{http}/s/{token}")


def refused(caplog: pytest.LogCaptureFixture) -> int:
    """How many session announcements the stream node refused so far (it logs each)."""
    return sum("ignored a malformed session announcement" in r.getMessage() for r in caplog.records)


def test_every_event_type_has_one_owner() -> None:
    """Every concrete event type (the catalog also holds their abstract bases, which nobody
    appends) is in the table."""
    assert set(OWNERS) == {t for t, model in CATALOG.items() if not model.__subclasses__()}


async def append_raw(nc: Any, service: str, envelopes: list[dict[str, Any]]) -> None:
    await bus.request_json(
        nc, bus.append_subject(service), {"events": envelopes, "expected": None}, timeout_s=5
    )


async def test_malformed_events_are_refused_with_a_reason(registry: Registry, nc: Any) -> None:
    sid = str(uuid.uuid4())
    good = envelope(
        SessionAttached(session_id=sid, stream_node="n", protocol="nbd", client_addr="a:1")
    ).model_dump(mode="json")
    blocks = envelope(
        BlocksRequested(session_id=sid, vdisk="v", version=1, extents=[(0, 0, 4096, "r")])
    ).model_dump(mode="json")

    def variant(base: dict[str, Any], **data: Any) -> dict[str, Any]:
        return {**base, "id": str(uuid.uuid4()), "data": {**base["data"], **data}}

    missing = variant(good)
    del missing["data"]["client_addr"]
    cases = {
        "extra": variant(good, is_admin=True),
        "missing": missing,
        "wrong type": variant(blocks, version="1"),
        "wrong literal": variant(good, protocol="smb"),
        "bad extent": variant(blocks, extents=[[0, 0, 4096, "x"]]),
        "other stream": {**variant(good), "stream_id": "session-someone-else"},
        "unknown type": {**variant(good), "type": "RootGranted"},
        "future": {**variant(good), "time": "2999-01-01T00:00:00Z"},
        "not an envelope": {"data": {}},
    }
    for name, bad in cases.items():
        with pytest.raises(bus.RemoteError) as e:
            # The good event first: a refused batch leaves nothing in the log.
            await append_raw(nc, "stream", [good, bad])
        assert e.value.kind == "invalid", name
    with pytest.raises(bus.RemoteError) as e:
        await append_raw(nc, "stream", [good, envelope(DeviceRegistered(
            mac=MAC, machine_id="m", hostname="h")).model_dump(mode="json")])  # fmt: skip
    assert e.value.kind == "forbidden"
    with pytest.raises(bus.RemoteError) as e:
        await append_raw(nc, "boot", [good])  # the stream's event, from boot
    assert e.value.kind == "forbidden" and "only stream does" in str(e.value)
    assert await registry.app.store.read_all(types=["SessionAttached"]) == []
    # The same event, well-formed and from its owner, is taken.
    await append_raw(nc, "stream", [good])
    assert len(await registry.app.store.read_all(types=["SessionAttached"])) == 1


async def test_a_forged_vdisk_written_into_the_log_by_hand_is_not_applied(
    registry: Registry, stream: ServiceRuntime, nc: Any
) -> None:
    """Past the door (written into PostgreSQL by hand): the projection checks the layer
    path itself, skips the version (a ProjectionError says so) and nothing is served."""
    secret_file(registry)
    for env in forged_vdisk("../shadow"):
        await insert_raw(registry, env.type, env.stream_id, env.data)
    await registry.app.catch_up()
    assert registry.app.projection.vdisks["evil"]["versions"] == {}
    [skipped] = await registry.app.store.read_all(types=["ProjectionError"])
    assert skipped.data["skipped_type"] == "VdiskVersionPublished"
    assert "not a plain file name" in skipped.data["error"]
    with pytest.raises(bus.RemoteError):
        await bus.request_json(nc, "streamboot.registry.session.open", {"mac": MAC})


async def test_a_refused_batch_does_not_block_the_events_after_it(
    registry: Registry, nc: Any
) -> None:
    """The data plane's queued sink drops a batch the door refuses (no retry changes the
    answer) and goes on with the next ones."""
    sink = QueuedEventSink(EventClient(nc, "stream"))
    task = asyncio.create_task(sink.run())
    try:
        await sink.emit(BootRequested(mac=MAC), None)  # boot's event, not the stream's
        for _ in range(200):
            if sink.dropped:
                break
            await asyncio.sleep(0.05)
        assert sink.dropped == 1
        sid = str(uuid.uuid4())
        await sink.emit(
            SessionAttached(session_id=sid, stream_node="n", protocol="nbd", client_addr="a:1"),
            sid,
        )
        await sink.drain()
        [attached] = await registry.app.store.read_all(types=["SessionAttached"])
        assert attached.data["session_id"] == sid
        assert await registry.app.store.read_all(types=["BootRequested"]) == []
    finally:
        task.cancel()


async def test_a_forged_api_token_over_the_bus_is_refused(registry: Registry, nc: Any) -> None:
    """An ApiTokenCreated appended over the bus would be a working admin token: no service
    may append it, nor revoke one or write the audit trail."""
    forged = [
        ApiTokenCreated(token_name="intruder", role="admin", token_hash="0" * 64, created_by="x"),
        ApiTokenRevoked(token_name="bootstrap-admin", revoked_by="x"),
        AdminActionPerformed(
            token_name="x",
            role="admin",
            method="POST",
            path="/devices",
            status=200,
            outcome="done",
        ),
    ]
    for service in bus.APPENDING_SERVICES:
        for event in forged:
            with pytest.raises(bus.RemoteError) as e:
                await append_raw(nc, service, [envelope(event).model_dump(mode="json")])
            assert e.value.kind == "forbidden", (service, type(event).__name__)
    assert await registry.app.store.read_all(types=[type(e).__name__ for e in forged]) == []
