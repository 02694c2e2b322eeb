"""Who may publish and subscribe what on the bus: one NATS user per role, and its rights.

This matrix is the contract every service depends on: the embedded nats-server's
``authorization`` block is generated from it (:func:`authorization_block`), and so is the
snippet `streamboot secrets nats-config` prints for an external server. A role may publish
only the subjects it sends on and subscribe only those it listens to (the subject map is in
``shared/bus.py``); servers answer requests through ``allow_responses``, requesters get their
replies on ``_INBOX.>``. Only the registry (whose relay publishes the log) may publish
``events.>``; a service appends events only on its own ``streamboot.events.append.<service>``.
JetStream's API is granted per stream: only the registry creates the event stream, each
role creates only its own KV buckets, and nobody deletes or purges a stream.

Names of other services' subjects and buckets are written here as literals (``shared`` does
not import ``services``); tests/foundation/test_bus_access.py checks them against the
services' own constants.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from shared.bus import APPEND_PREFIX, EVENTS_STREAM, HEARTBEAT_BUCKET
from shared.contracts import registry as registry_contract

ROLES = ("registry", "stream", "cache", "boot", "cli")

# KV buckets owned by one service (the cache's placement.py, the boot service's stores).
CACHE_OWNERS_BUCKET = "streamboot_cache_owners"
BOOT_TRACES_BUCKET = "streamboot_boot_traces"
BOOT_HANDOFF_BUCKET = "streamboot_boot_handoff"
BOOT_NONCES_BUCKET = "streamboot_boot_nonces"
BOOT_LEASES_BUCKET = "streamboot_dhcp_leases"  # full DHCP's leases shared by boot services
# A destructive consumer confirms a session's close with the registry (stream and cache).
SESSION_STATUS = registry_contract.STATUS

INBOX = "_INBOX.>"
API = "$JS.API"


@dataclass(frozen=True)
class Grant:
    """What one role's user may do: core subjects it may publish and subscribe (NATS
    wildcards), whether it may answer the requests it receives (``allow_responses``), the
    KV buckets it writes (and creates) or only reads, and what it does with the event
    stream (``create``: the registry; ``consume``: a durable pull consumer)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool = False
    kv_write: tuple[str, ...] = ()
    kv_read: tuple[str, ...] = ()
    event_stream: str = ""  # "", "create" or "consume"

    def publish_allow(self) -> tuple[str, ...]:
        """Every subject this role may publish, JetStream's API included."""
        out = list(self.publish)
        for bucket in self.kv_write:
            out += [*kv_read(bucket), f"$KV.{bucket}.>", f"{API}.STREAM.CREATE.KV_{bucket}"]
        for bucket in self.kv_read:
            out += kv_read(bucket)
        if self.event_stream == "create":
            out += [f"{API}.STREAM.INFO.{EVENTS_STREAM}", f"{API}.STREAM.CREATE.{EVENTS_STREAM}"]
        elif self.event_stream == "consume":
            out += event_consumer()
        return tuple(out)

    def subscribe_allow(self) -> tuple[str, ...]:
        return (*self.subscribe, INBOX)


def kv_read(bucket: str) -> list[str]:
    """Reading a KV bucket: its info, gets (direct or not), and watches/key lists (an
    ordered consumer: created, flow-controlled, deleted)."""
    stream = f"KV_{bucket}"
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.>",
        f"{API}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def event_consumer() -> list[str]:
    """A durable pull consumer on the event stream (its creation, fetches, acks)."""
    return [
        f"{API}.STREAM.INFO.{EVENTS_STREAM}",
        f"{API}.CONSUMER.INFO.{EVENTS_STREAM}.>",
        f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.>",
        f"{API}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.>",
        f"$JS.ACK.{EVENTS_STREAM}.>",
    ]


MATRIX: dict[str, Grant] = {
    # The log: appends come in, events go out (the relay), sessions are announced to their
    # stream node, write caches listed for `status`/sweeps; the console's maintenance
    # commit reads a kept write cache from its node (as the CLI's `vdisk commit` does).
    "registry": Grant(
        publish=(
            "events.>",
            "streamboot.stream.*.session.prepare",
            "streamboot.cache.wc.list",
            "streamboot.cache.wc.open",
            "streamboot.cache.node.*.wc.map",
            "streamboot.cache.node.*.wc.read",
        ),
        # events.>: the web console's live view follows the log's events as published.
        subscribe=("streamboot.registry.>", f"{APPEND_PREFIX}.>", "events.>"),
        responds=True,
        kv_write=(HEARTBEAT_BUCKET,),
        event_stream="create",
    ),
    # The data plane: resolves tokens at the registry, talks to the cache service, appends
    # its own events; hears closes, announcements and write-cache takeovers.
    "stream": Grant(
        publish=(
            f"{APPEND_PREFIX}.stream",
            "streamboot.registry.session.resolve",
            SESSION_STATUS,
            "streamboot.cache.wc.open",
            "streamboot.cache.rc.open",
            "streamboot.cache.rc.read",
            "streamboot.cache.node.*.wc.write",
            "streamboot.cache.node.*.wc.read",
            "streamboot.cache.node.*.wc.map",
        ),
        subscribe=(
            "events.SessionClosed.>",
            "streamboot.stream.*.session.prepare",
            "streamboot.cache.wc.attached",
        ),
        kv_write=(HEARTBEAT_BUCKET,),
    ),
    # Write and read caches: answers its subjects, forwards opens to the holding node,
    # tells stream nodes of attaches, follows the log's events it acts on.
    "cache": Grant(
        publish=(
            f"{APPEND_PREFIX}.cache",
            SESSION_STATUS,
            "streamboot.cache.wc.attached",
            "streamboot.cache.node.*.wc.open",
            "streamboot.cache.node.*.stats",
        ),
        subscribe=(
            "streamboot.cache.wc.open",
            "streamboot.cache.wc.list",
            "streamboot.cache.rc.open",
            "streamboot.cache.rc.read",
            "streamboot.cache.stats",
            "streamboot.cache.node.>",
            "events.BlocksRequested.>",
            "events.SessionClosed.>",
            "events.ClientBooted.>",
            "events.BootRequested.>",
        ),
        responds=True,
        kv_write=(HEARTBEAT_BUCKET, CACHE_OWNERS_BUCKET),
        event_stream="consume",
    ),
    # PXE: asks the registry about devices and sessions, appends its own events.
    "boot": Grant(
        publish=(
            f"{APPEND_PREFIX}.boot",
            "streamboot.registry.device.lookup",
            "streamboot.registry.session.open",
            "streamboot.registry.session.resolve",
            # A running client whose stream nodes all failed asks for the live ones.
            "streamboot.registry.session.nodes",
            # A kernel that did not load gives its session back.
            "streamboot.registry.session.close",
        ),
        subscribe=(),
        kv_write=(
            HEARTBEAT_BUCKET,
            BOOT_TRACES_BUCKET,
            BOOT_HANDOFF_BUCKET,
            BOOT_NONCES_BUCKET,
            BOOT_LEASES_BUCKET,
        ),
    ),
    # The operator's CLI (and `up` waiting for heartbeats): `status` reads heartbeats,
    # `vdisk commit` reads a kept write cache from its node, an operator reads the cache
    # nodes' figures (`stats`, read-only). Everything else goes through the admin API.
    "cli": Grant(
        publish=(
            "streamboot.cache.wc.open",
            "streamboot.cache.node.*.wc.map",
            "streamboot.cache.node.*.wc.read",
            "streamboot.cache.stats",
        ),
        subscribe=(),
        kv_read=(HEARTBEAT_BUCKET,),
    ),
}


@dataclass(frozen=True)
class NatsUser:
    """One user of the server's authorization block."""

    name: str
    password: str
    grant: Grant


def role_users(passwords: Mapping[str, str]) -> list[NatsUser]:
    """The users of every role (user name = role), with their passwords."""
    return [NatsUser(role, passwords[role], MATRIX[role]) for role in ROLES]


def authorization_block(users: list[NatsUser]) -> str:
    """The nats-server ``authorization { users = [...] }`` block for ``users``. Every
    string is quoted (JSON), so ``$JS``/``$KV`` are never read as config variables."""
    q = json.dumps
    lines = ["authorization {", "  users = ["]
    for u in users:
        lines += [
            "    {",
            f"      user: {q(u.name)}",
            f"      password: {q(u.password)}",
            "      permissions: {",
            "        publish: { allow: [",
            *(f"          {q(s)}," for s in u.grant.publish_allow()),
            "        ] }",
            "        subscribe: { allow: [",
            *(f"          {q(s)}," for s in u.grant.subscribe_allow()),
            "        ] }",
        ]
        if u.grant.responds:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def matrix_table() -> str:
    """The matrix as a Markdown table (docs/security.md holds it; a test checks they agree)."""

    def cell(items: list[str]) -> str:
        return "<br>".join(items) or "-"

    rows = [
        "| role | publishes | subscribes | answers requests | KV buckets | event stream |",
        "|---|---|---|---|---|---|",
    ]
    for role in ROLES:
        g = MATRIX[role]
        kv = [f"`{b}` (read, write)" for b in g.kv_write] + [f"`{b}` (read)" for b in g.kv_read]
        rows.append(
            f"| `{role}` | {cell([f'`{s}`' for s in g.publish])} "
            f"| {cell([f'`{s}`' for s in g.subscribe_allow()])} "
            f"| {'yes' if g.responds else 'no'} | {cell(kv)} | {g.event_stream or '-'} |"
        )
    return "\n".join(rows) + "\n"
