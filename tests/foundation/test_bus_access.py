"""Authorization on the bus, against the real nats-server with `up`'s authorization: no
anonymous client, and each role publishes and subscribes only what shared/bus_access.py
grants it (a forbidden publish is refused with a permissions violation and nobody gets it).

Clients that break a rule on purpose are named ``violator-...`` (tests/conftest.py lets
their violations pass)."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from services.boot import boot_trace, handoff_store, shared_leases
from services.cache import placement
from services.registry import nats_api
from shared import bus, event_log
from shared.bus_access import (
    BOOT_HANDOFF_BUCKET,
    BOOT_LEASES_BUCKET,
    BOOT_NONCES_BUCKET,
    BOOT_TRACES_BUCKET,
    CACHE_OWNERS_BUCKET,
    MATRIX,
    ROLES,
    SESSION_STATUS,
    matrix_table,
)
from shared.contracts import registry as registry_client
from shared.contracts import stream as announce
from shared.contracts.cache import wire
from shared.contracts.registry import RESOLVE as RESOLVE_SUBJECT
from tests.conftest import BusServer, wait_for

ROOT = Path(__file__).resolve().parents[2]
APPENDERS = bus.APPENDING_SERVICES


class Client:
    """A connection as ``role`` that records the errors the server sends it."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    @classmethod
    async def connect(cls, server: BusServer, role: str, name: str) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(
            server.url, user=role, password=server.passwords[role], name=name, error_cb=on_error
        )
        return cls(nc, errors)

    async def refused(self, what: str, subject: str) -> None:
        """Until the server has told this client it may not ``what`` (e.g. "publish to")
        ``subject``."""
        want = f'permissions violation for {what} "{subject.lower()}"'
        await wait_for(
            lambda: any(want in e.lower() for e in self.errors), f"{want}; got {self.errors}"
        )


def forbidden_publishes(role: str) -> list[str]:
    """Subjects ``role`` must not publish: the log's, other services' appends and
    announcements, the cache's notices, JetStream's stream admin."""
    out = []
    if role != "registry":
        out += ["events.SessionClosed.x", "streamboot.stream.node-1.session.prepare"]
        out += ["$JS.API.STREAM.CREATE.STREAMBOOT_EVENTS"]
    out += [bus.append_subject(s) for s in APPENDERS if s != role]
    if role != "cache":
        out += [wire.WC_ATTACHED, f"$KV.{CACHE_OWNERS_BUCKET}.some-key"]
    out += ["$JS.API.STREAM.DELETE.STREAMBOOT_EVENTS", "$JS.API.STREAM.PURGE.STREAMBOOT_EVENTS"]
    return out


async def test_an_anonymous_client_is_refused(nats_server: BusServer) -> None:
    with pytest.raises(bus.BusError, match="refused the login \\(no credentials\\)"):
        await bus.connect(nats_server.url, "violator-anonymous", connect_timeout_s=5)
    with pytest.raises(bus.BusError, match="refused the login \\(user 'stream'\\)"):
        await bus.connect(
            nats_server.url,
            "violator-guess",
            credentials=("stream", "not-the-password"),
            connect_timeout_s=5,
        )
    nc = await bus.connect(
        nats_server.url, "stream-ok", credentials=nats_server.credentials("stream")
    )
    await nc.close()


@pytest.mark.parametrize("role", ROLES)
async def test_a_role_cannot_publish_what_is_not_its_own(
    nats_server: BusServer, nats_url: str, role: str
) -> None:
    subjects = forbidden_publishes(role)
    listener = await nats.connect(nats_url)
    seen: list[str] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    for subject in subjects:
        await listener.subscribe(subject, cb=on_msg)
    await listener.flush()
    client = await Client.connect(nats_server, role, f"violator-{role}")
    try:
        for subject in subjects:
            await client.nc.publish(subject, b'{"forged": true}')
        await client.nc.flush()
        for subject in subjects:
            await client.refused("publish to", subject)
        await listener.flush()
        assert seen == []  # refused at the server: no subscriber got any of them
    finally:
        await client.nc.close()
        await listener.close()


async def test_a_role_cannot_listen_to_what_is_not_its_own(nats_server: BusServer) -> None:
    client = await Client.connect(nats_server, "stream", "violator-listener")
    try:
        await client.nc.subscribe("streamboot.events.append.>")
        await client.nc.subscribe("streamboot.registry.>")
        await client.nc.flush()
        for subject in ("streamboot.events.append.>", "streamboot.registry.>"):
            await client.refused("subscription to", subject)
    finally:
        await client.nc.close()


@pytest.mark.parametrize("service", APPENDERS)
async def test_a_service_appends_on_its_own_subject_only(
    nats_server: BusServer, service: str
) -> None:
    """What the registry's append handler sees: the subject names the service, and only
    that service can send on it."""
    registry = await Client.connect(nats_server, "registry", "append-handler")
    got: list[tuple[str, bytes]] = []

    async def on_append(msg: nats.aio.msg.Msg) -> None:
        got.append((msg.subject, msg.data))
        await msg.respond(b"{}")

    await registry.nc.subscribe(f"{bus.APPEND_PREFIX}.*", cb=on_append)
    await registry.nc.flush()
    sender = await Client.connect(nats_server, service, f"{service}-appender")
    try:
        reply = await bus.request_json(sender.nc, bus.append_subject(service), {"events": []})
        assert reply == {}
        assert got == [(bus.append_subject(service), bus.encode({"events": []}))]
        assert sender.errors == []
    finally:
        await sender.nc.close()
        await registry.nc.close()


async def test_the_event_stream_is_the_registrys(nats_server: BusServer, nats_url: str) -> None:
    """Another role's attempt to delete the event stream is refused; the stream stays."""
    admin = await nats.connect(nats_url)
    try:
        await bus.ensure_event_stream(admin.jetstream())
        client = await Client.connect(nats_server, "cache", "violator-stream-admin")
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await client.nc.jetstream(timeout=1).delete_stream(bus.EVENTS_STREAM)
        finally:
            await client.nc.close()
        assert any("permissions violation" in e.lower() for e in client.errors)
        info = await admin.jetstream().stream_info(bus.EVENTS_STREAM)
        assert info.config.name == bus.EVENTS_STREAM
    finally:
        await admin.close()


def covered(subject: str, patterns: tuple[str, ...]) -> bool:
    """Whether NATS lets ``subject`` through one of ``patterns`` (``*``, ``>`` wildcards)."""

    def match(tokens: list[str], pattern: list[str]) -> bool:
        if not pattern:
            return not tokens
        if pattern[0] == ">":
            return bool(tokens)
        if not tokens or pattern[0] not in ("*", tokens[0]):
            return False
        return match(tokens[1:], pattern[1:])

    return any(match(subject.split("."), p.split(".")) for p in patterns)


def test_the_matrix_names_the_services_own_subjects_and_buckets() -> None:
    """shared/ writes other services' names as literals: they must be the services' own."""
    assert CACHE_OWNERS_BUCKET == placement.OWNERS_BUCKET
    assert BOOT_TRACES_BUCKET == boot_trace.BUCKET
    assert BOOT_HANDOFF_BUCKET == handoff_store.BOOTS_BUCKET
    assert BOOT_NONCES_BUCKET == handoff_store.NONCES_BUCKET
    assert BOOT_LEASES_BUCKET == shared_leases.LEASES_BUCKET
    assert SESSION_STATUS == event_log.SESSION_STATUS_SUBJECT
    stream, cache, boot, registry = (MATRIX[r] for r in ("stream", "cache", "boot", "registry"))
    assert {RESOLVE_SUBJECT, wire.WC_OPEN, wire.RC_OPEN, wire.RC_READ} <= set(stream.publish)
    for verb in (wire.V_WC_WRITE, wire.V_WC_READ, wire.V_WC_MAP):
        assert covered(wire.node_subject("cache:1", verb), stream.publish)
    for verb in (wire.V_WC_OPEN, wire.V_WC_WRITE, wire.V_WC_READ, wire.V_WC_MAP, wire.V_STATS):
        assert covered(wire.node_subject("cache:1", verb), cache.subscribe)
    assert wire.WC_ATTACHED in stream.subscribe and wire.WC_ATTACHED in cache.publish
    prepare = announce.prepare_subject("stream node.1")
    assert covered(prepare, stream.subscribe) and covered(prepare, registry.publish)
    boot_asks = {registry_client.LOOKUP, registry_client.OPEN, registry_client.RESOLVE}
    assert boot_asks | {registry_client.CLOSE} <= set(boot.publish)
    assert SESSION_STATUS in stream.publish and SESSION_STATUS in cache.publish
    assert f"{nats_api.PREFIX}.>" in registry.subscribe
    assert {wire.WC_OPEN, wire.WC_LIST, wire.RC_OPEN, wire.RC_READ, wire.STATS} <= set(
        cache.subscribe
    )
    # Only the registry's relay publishes the log.
    assert [r for r in ROLES if any(s.startswith("events.") for s in MATRIX[r].publish)] == [
        "registry"
    ]


def test_docs_show_the_matrix() -> None:
    """docs/security.md shows the permission matrix as it is (`uv run python
    deploy/render_nats_auth.py` writes it)."""
    assert matrix_table() in (ROOT / "docs" / "security.md").read_text()
