"""Sessions: opened (with back-pressure), resolved for stream nodes, closed, swept, and
the boot trace each one ends."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import time
from collections.abc import Callable, Iterator

from opentelemetry import trace

from services.registry.app.core import log
from services.registry.app.devices import DeviceCommands
from services.registry.app.tokens import new_session_token, token_hash
from services.registry.app.vdisks import VdiskCommands
from services.registry.domain import sessions, vdisks
from services.registry.domain.errors import DomainError, busy, invalid, not_found
from services.registry.domain.sessions import (
    StreamNode,
    choose_replay_node,
    failover_stream_nodes,
    live_stream_nodes,
    pick_stream_node,
    session_url,
)
from services.registry.projection import Projection, Record
from shared.boot_flow import parse_event
from shared.contracts.registry import SessionNodes, SessionRecord
from shared.endpoints import host_port
from shared.envelope import uuid7
from shared.events import Event, SessionAttached
from shared.heartbeat import HeartbeatsUnavailable
from shared.iscsi_names import TARGET_PREFIX, initiator_iqn, iscsi_uri
from shared.metrics import count_boot
from shared.telemetry import (
    context_from_traceparent,
    new_traceparent,
    record_span_with_ids,
)

# A session_nodes answer names at most this many (SessionNodes' bound).
MAX_NODES_ANSWERED = 64


class SessionCommands(DeviceCommands, VdiskCommands):
    # --- sessions ---------------------------------------------------------------------

    def _placement(
        self, beats: list[Record]
    ) -> tuple[Callable[[Projection], StreamNode], str | None]:
        """How a session open picks its stream node, on the projection it is decided on
        (the sessions placed before it in its group included), and a warning when no node
        is alive."""
        if live_stream_nodes(beats):
            return lambda p: pick_stream_node(beats, p.live_by_node) or self._default_node(), None
        return (
            lambda _p: self._default_node(),
            "no stream node is alive (no heartbeat); the endpoints are the configured defaults "
            "and will work once a stream node runs there",
        )

    def _default_node(self) -> StreamNode:
        s = self.settings
        host = s.advertised_host
        return StreamNode(
            node="",
            nbd=host_port(host, s.nbd_port),
            http=f"http://{host_port(host, s.http_stream_port)}",
            iscsi=host_port(host, s.iscsi_port),
        )

    def _busy(self, why: str) -> DomainError:
        self.opens_refused_busy += 1
        retry = random.randint(1, self.settings.registry_busy_retry_max_s)
        return busy(f"the registry is busy ({why}): nothing was opened, retry in {retry}s", retry)

    async def _placement_beats(self) -> list[Record]:
        """The heartbeats a session is placed by; "busy, retry" (nothing opened) while the
        view of them cannot vouch for them (not loaded yet, or its watch being made again):
        placed blind, a session could land on a dead node."""
        if self._heartbeats is None:
            return []
        try:
            return await self._heartbeats()
        except HeartbeatsUnavailable as exc:
            raise self._busy(str(exc)) from None

    @contextlib.contextmanager
    def _admitted_open(self) -> Iterator[float]:
        """Back-pressure on session opens: refused at once (busy) when more are under way
        than can be committed before their callers give up; else admitted, with the
        deadline (loop time) by which it must be decided."""
        if self._opens_in_flight >= self.settings.registry_max_waiting_opens:
            raise self._busy(f"{self._opens_in_flight} session opens under way")
        self._opens_in_flight += 1
        try:
            yield asyncio.get_running_loop().time() + self.settings.registry_open_max_wait_s
        finally:
            self._opens_in_flight -= 1

    async def open_session(
        self,
        mac: str | None,
        *,
        smbios_uuid: str | None = None,
        vdisk: str | None = None,
        maintenance: bool = False,
        correlation_id: str | None = None,
        boot_traceparent: str | None = None,
        boot_started_ns: int | None = None,
        client_addr: str | None = None,
    ) -> Record:
        """A boot session: SessionOpened, plus (in the answer only) the session token, how
        it boots (``boot``: vdisks.boot_plan) and the device's extra kernel arguments.
        ``client_addr``: where the client asked from (the boot service saw it); the
        session's exports accept that address only (docs/security.md)."""
        with self._admitted_open() as deadline:
            return await self._open_session(
                mac, deadline, smbios_uuid=smbios_uuid, vdisk=vdisk, maintenance=maintenance,
                correlation_id=correlation_id, boot_traceparent=boot_traceparent,
                boot_started_ns=boot_started_ns, client_addr=client_addr,
            )  # fmt: skip

    async def _open_session(
        self,
        mac: str | None,
        deadline: float,
        *,
        smbios_uuid: str | None,
        vdisk: str | None,
        maintenance: bool,
        correlation_id: str | None,
        boot_traceparent: str | None,
        boot_started_ns: int | None,
        client_addr: str | None,
    ) -> Record:
        if client_addr is not None:
            client_addr = _check_address(client_addr)
        # One trace per boot: the boot service names the root it began at the first DHCP
        # packet; a client that skipped PXE gets a root here, at the session's opening.
        if not boot_traceparent:
            boot_traceparent, boot_started_ns = new_traceparent(), time.time_ns()
        parent = context_from_traceparent(boot_traceparent)
        if trace.get_current_span().get_span_context().is_valid:
            parent = None  # the caller's span (inside the boot's trace) is the better parent
        with self._tracer.start_as_current_span("registry.session.open", context=parent) as span:
            dev = await self._known_or_auto_added(mac, smbios_uuid)
            span.set_attribute("streamboot.mac", dev["mac"])
            beats = await self._placement_beats()
            place, warning = self._placement(beats)
            placed: list[StreamNode] = []
            token = new_session_token()
            sid = str(uuid7())

            def decide(p: Projection) -> list[Event]:
                placed.append(place(p))
                return sessions.open_session(
                    p,
                    mac=dev["mac"],
                    vdisk=vdisk,
                    maintenance=maintenance,
                    session_id=sid,
                    token_hash=token_hash(token),
                    node=placed[-1],
                    boot_traceparent=boot_traceparent,
                    boot_started_ns=boot_started_ns,
                    client_addr=client_addr,
                )

            await self._execute(
                decide,
                correlation_id=correlation_id or sid,
                deadline=deadline,
                audited=True,
            )
            span.set_attribute("streamboot.session_id", sid)
            count_boot()
            s = self.projection.sessions[sid]
            node = placed[-1]
            others = failover_stream_nodes(beats, node) if warning is None else []
            view = self.session_view(s)
            view.update(
                token=token,
                nbd_uri=view["nbd_uri"] + token,
                http_url=view["http_url"] + token,
                boot=vdisks.boot_plan(self.projection.vdisks[s["vdisk"]], s["version"]),
                kernel_args=self.projection.devices[s["mac"]].get("kernel_args"),
                nbd_nodes=[n.nbd for n in others],
                # The same session on the other nodes, for iPXE's multipath sanboot.
                http_nodes=[session_url(n, token) for n in others],
            )
            if view.get("iscsi_portal"):
                view.update(
                    iscsi_target=TARGET_PREFIX + token,
                    iscsi_uri=iscsi_uri(view["iscsi_portal"], token),
                )
            if warning:
                view["warning"] = warning
            await self._announce_session(node.node, token)
            return view

    async def open_replay_session(
        self, original_id: str, *, stream_node: str | None = None
    ) -> Record:
        """A replay session for a past (or live) session's vdisk version, on ``stream_node``
        or the node the original used if alive: see ``ReplaySessionOpened``. No boot is
        counted and no boot trace begins; the caller closes it when done."""
        with self._admitted_open() as deadline:
            return await self._open_replay_session(original_id, stream_node, deadline)

    async def _open_replay_session(
        self, original_id: str, stream_node: str | None, deadline: float
    ) -> Record:
        original, used = await self._recorded_session(original_id)
        beats = await self._placement_beats()
        node = choose_replay_node(beats, stream_node, used)
        token = new_session_token()
        sid = str(uuid7())
        await self._execute(
            lambda p: sessions.open_replay(
                p, original=original, session_id=sid, token_hash=token_hash(token), node=node
            ),
            correlation_id=sid,
            deadline=deadline,
        )
        view = self.session_view(self.projection.sessions[sid])
        view.update(token=token, nbd_uri=view["nbd_uri"] + token, http_url=view["http_url"] + token)
        await self._announce_session(node.node, token)
        return view

    async def _announce_session(self, node: str, token: str) -> None:
        """Let the session's stream node open it now, while the client is still on its way
        (``shared/contracts/stream.py``). Best effort: without it the client's first
        connection opens the session."""
        if not node or self._announce is None:
            return
        try:
            await self._announce(node, token, await self.resolve(token))
        except Exception as exc:
            log.warning("registry: could not announce a session to stream node %s: %s", node, exc)

    async def _recorded_session(self, session_id: str) -> tuple[Record, list[str]]:
        """A session's SessionOpened data, read from the log (closed sessions are not in
        the projection), and the stream nodes it was attached to, in order."""
        if not session_id:
            raise invalid("which session? (a session id)")
        events = await self.store.read_stream(f"session-{session_id}")
        opened = next((e for e in events if e.type == "SessionOpened"), None)
        if opened is None:
            replay = next((e for e in events if e.type == "ReplaySessionOpened"), None)
            if replay is not None:
                raise invalid(
                    f"session {session_id} is a replay of {replay.data['replay_of']}, "
                    "not a boot: replay that session"
                )
            raise not_found(f"unknown session {session_id}")
        attached = (parse_event(e.type, e.data) for e in events if e.type == "SessionAttached")
        used = [a.stream_node for a in attached if isinstance(a, SessionAttached)]
        used.append(opened.data.get("stream_node") or "")
        return opened.data, [n for n in dict.fromkeys(used) if n]

    async def close_session(self, token_or_id: str, reason: str = "closed-by-request") -> Record:
        h = token_hash(token_or_id)
        closing: list[Record] = []

        def decide(p: Projection) -> list[Event]:
            s = sessions.find_session(p, token_or_id, h)
            closing.append(dict(s))
            return sessions.close(p, s, reason)

        stored = await self._execute(decide)
        finish_boot_trace(closing[-1], reason, self.projection)
        return {"closed": stored[0].data["session_id"], "reason": reason}

    async def session_status(self, session_id: str) -> Record:
        """Whether a session is live and whether its close is in the log, read from the log
        itself (a replica's projection may lag): what a consumer checks before it acts on a
        SessionClosed it was told of."""
        if not session_id:
            raise invalid("which session? (a session id)")
        rows = await self.store.read_all(
            types=["SessionClosed"], stream_id=f"session-{session_id}", limit=1
        )
        closed = rows[0] if rows else None
        return {
            "session_id": session_id,
            "live": closed is None and session_id in self.projection.sessions,
            "closed": closed is not None,
            "reason": closed.data.get("reason") if closed is not None else None,
        }

    def list_sessions(self) -> list[Record]:
        ss = self.projection.sessions.values()
        return [self.session_view(s) for s in sorted(ss, key=lambda s: s["opened_at"])]

    async def list_sessions_with_usage(self) -> list[Record]:
        """The live sessions with their write-cache usage from the cache nodes
        (``write_cache_used``/``_capacity``; None when it cannot be asked right now, or when
        a live cache node did not answer and the session's cache is not in the answers)."""
        views = self.list_sessions()
        usage: dict[str, Record] = {}
        complete = True
        if self._write_caches is not None:
            try:
                caches, complete = await self._write_caches()
                usage = {c["session_id"]: c for c in caches if c.get("session_id")}
            except Exception as exc:
                log.info("registry: write-cache usage unavailable (%s)", exc)
                for v in views:
                    v["write_cache_used"] = v["write_cache_capacity"] = None
                return views
        for v in views:
            c = usage.get(v["session_id"])
            if c is None and not complete:
                v["write_cache_used"] = v["write_cache_capacity"] = None
                continue
            c = c or {}
            v["write_cache_used"] = c.get("used", 0)
            v["write_cache_capacity"] = c.get("capacity")
            if c.get("node"):
                v["write_cache_node"] = c["node"]
        return views

    @staticmethod
    def session_view(s: Record) -> Record:
        view = {k: v for k, v in s.items() if k != "token_hash"}
        # The device's iSCSI initiator name: its iSCSI logins must give it (a replay is not
        # the device, and has none).
        view["initiator_iqn"] = None if s.get("replay_of") else initiator_iqn(s["mac"])
        return view

    async def _live_session_id(self, token: str) -> str:
        """The id of the live session a token opens, or ``not_found``."""
        h = token_hash(token)
        sid = self.projection.session_by_token_hash.get(h)
        if sid is None:
            await self.catch_up()  # opened on another replica a moment ago?
            sid = self.projection.session_by_token_hash.get(h)
        if sid is None:
            raise not_found("unknown or closed session token")
        return sid

    async def session_nodes(self, token: str) -> Record:
        """Every live stream node's NBD endpoint now, least loaded first, for a running
        client whose known nodes all failed (the boot service's ``/failover-nodes``,
        docs/failover.md); with the address the session's exports accept."""
        sid = await self._live_session_id(token)
        beats = await self._heartbeats() if self._heartbeats is not None else []
        nodes = sorted(live_stream_nodes(beats), key=lambda n: (n.load, n.node))
        return SessionNodes(
            session_id=sid,
            client_addr=self.projection.sessions[sid].get("client_addr"),
            nbd_nodes=[n.nbd for n in nodes][:MAX_NODES_ANSWERED],
        ).model_dump()

    async def resolve(self, token: str) -> Record:
        """What a session token opens, for a stream node."""
        sid = await self._live_session_id(token)
        s = self.projection.sessions[sid]
        vd = self.projection.vdisks[s["vdisk"]]
        replay_of = s.get("replay_of")
        return SessionRecord(
            session_id=sid,
            # A replay is not the device: nothing on the node may be keyed by its MAC.
            mac=None if replay_of else s["mac"],
            hostname=s["hostname"],
            vdisk=s["vdisk"],
            version=s["version"],
            size=vd["versions"][s["version"]]["size"],
            layers=self._served_layers(vd, s["version"]),
            read_only=s["read_only"],
            write_cache=s["write_cache"],
            write_cache_persistence=s["write_cache_persistence"],
            writes_to_vdisk=s.get("writes_to_vdisk", False),
            store=vd["store"],
            boot_traceparent=s.get("boot_traceparent"),
            replay_of=replay_of,
            client_addr=s.get("client_addr"),
            # What its iSCSI logins must give (None: no CHAP). Only the stream and boot
            # roles get this answer (shared/bus_access.py): docs/security.md.
            chap=None if replay_of else self.chap_record(s["mac"]),
            initiator_iqn=None if replay_of else initiator_iqn(s["mac"]),
        ).model_dump()

    async def sweep(self, now: float | None = None) -> list[str]:
        """Close sessions whose client left (after the detach grace) or that idled out."""
        now = time.time() if now is None else now
        s = self.settings
        due_at = functools.partial(
            sessions.expired,
            now=now,
            idle_timeout_s=s.session_idle_timeout_s,
            detach_grace_s=s.session_detach_grace_s,
            handoff_grace_s=s.session_handoff_grace_s,
            alive_nodes=await self._alive_stream_nodes(),
        )
        due = due_at(self.projection)
        closed = []
        for sid, reason in due:
            closing: list[Record] = []

            def decide(
                p: Projection, sid: str = sid, reason: str = reason, closing: list[Record] = closing
            ) -> list[Event]:
                # Re-check on the caught-up state: it may have re-attached or been closed.
                still = {x for x, _ in due_at(p)}
                if sid not in still:
                    return []
                closing.append(dict(p.sessions[sid]))
                return sessions.close(p, p.sessions[sid], reason)

            if await self._execute(decide):
                closed.append(sid)
                finish_boot_trace(closing[-1], reason, self.projection)
        return closed

    async def _alive_stream_nodes(self) -> dict[str, float] | None:
        """The stream nodes heartbeating now, with the start time of their current
        instance (an attachment older than that died with the previous one); None when
        heartbeats cannot be read (then attachments are trusted, not closed on a hunch)."""
        if self._heartbeats is None:
            return None
        try:
            beats = await self._heartbeats()
        except Exception as exc:
            log.warning("registry: heartbeats unreadable (%s); keeping attached sessions", exc)
            return None
        return {
            b["node"]: float(b.get("started_at", 0))
            for b in beats
            if b.get("service") == "stream" and b.get("alive")
        }


def _check_address(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        raise invalid(f"bad client address {addr!r}") from None


def finish_boot_trace(session: Record, reason: str, p: Projection) -> None:
    """Write the boot's root span now that its session ended: from the first DHCP packet (or
    the session's opening) to now, with what the boot moved."""
    tp = session.get("boot_traceparent")
    if not tp:
        return
    start = session.get("boot_started_ns") or int(session["opened_at"] * 1e9)
    record_span_with_ids(
        f"boot {session.get('hostname') or session['mac']}",
        tp,
        start_ns=int(start),
        end_ns=time.time_ns(),
        attributes={
            "streamboot.mac": session["mac"],
            "streamboot.session_id": session["session_id"],
            "streamboot.vdisk": session["vdisk"],
            "streamboot.version": session["version"],
            "streamboot.close_reason": reason,
            "streamboot.bytes_read": int(session.get("bytes_read", 0)),
            "streamboot.bytes_written": int(session.get("bytes_written", 0)),
        },
        tracer_name="streamboot.registry",
    )
