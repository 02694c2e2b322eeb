"""Sessions on this stream node: one backend stack per session token, shared by connections.

Every connection that names the same token gets the same :class:`Session`, hence the same
write cache object: a write on one connection is read back on another, and a flush covers
all of them (what NBD_FLAG_CAN_MULTI_CONN promises). A session outlives its last connection
by ``session_linger_s``; then its stack (and a server-side write cache) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Literal

from opentelemetry import trace

from services.stream.busy_poll import BusyPoll
from services.stream.handshake_gate import HandshakeGate
from services.stream.path.backend import Backend
from services.stream.path.cached_store import CachedStoreBackend, CacheLink
from services.stream.path.chain import ChainBackend
from services.stream.path.profile_hint import ProfileHint
from services.stream.path.remote_write_cache import RemoteWriteCache, attach_stack
from services.stream.path.spare_files import SpareFiles
from services.stream.path.write_cache import WriteCache
from services.stream.settings import StreamSettings
from services.stream.spec import EventSink, ExportSpec, SessionResolver
from shared.events import (
    BlocksRequested,
    Event,
    SessionAddressRefused,
    SessionAttached,
    SessionDetached,
)
from shared.keyed_locks import KeyedLocks
from shared.telemetry import context_from_traceparent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("streamboot.stream")

Protocol_ = Literal["nbd", "http", "iscsi"]


def build_stack(
    spec: ExportSpec,
    settings: StreamSettings,
    cache: CacheLink | None = None,
    spares: SpareFiles | None = None,
) -> Backend:
    """write cache -> version chain (no write cache on a read-only export).

    With a cache service (``cache``), server-side write caches live there (a local mirror
    keeps reads fast) and a vdisk of a non-local store is read through its shared read
    cache instead of a chain; a local vdisk's shared read cache is its files' page cache.
    ``spares``: disk files made ahead for the write cache (spare_files.py)."""
    bottom: Backend
    if cache is not None and spec.store != "local":
        bottom = CachedStoreBackend(spec, cache)
    else:
        bottom = ChainBackend(spec.layers)
        if cache is not None:
            bottom = ProfileHint(bottom, spec, cache)
    backend = bottom
    if backend.size != spec.size:
        backend.close()
        raise ValueError(
            f"chain of {spec.vdisk}@{spec.version} is {backend.size} bytes, not {spec.size}"
        )
    if not spec.export_read_only:
        if settings.write_cache_dir is not None:
            settings.write_cache_dir.mkdir(parents=True, exist_ok=True)
        if cache is not None:
            backend = RemoteWriteCache(
                backend, spec, cache, settings.node_id, settings.write_cache_dir, spares
            )
        else:
            backend = WriteCache(backend, spec.write_cache, settings.write_cache_dir, spares)
    return backend


class Session:
    def __init__(self, token: str, spec: ExportSpec, backend: Backend, mgr: SessionManager):
        self.token = token
        self.spec = spec
        self.backend = backend
        self.mgr = mgr
        self.connections = 0
        # Live connections, each with an ``abort(reason)``: closed with the session.
        self.conns: set = set()
        self.closed = False
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.read_once = False
        # Opened on the registry's announcement; no client has connected yet.
        self.announced = False
        # Pending while an announced session attaches (its write cache being placed at the
        # cache service): no request is served before. None once attached.
        self.ready: asyncio.Future[None] | None = None
        self.record_blocks = spec.record_blocks
        self._extents: list[list] = []
        self._flusher: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    async def wait_ready(self) -> bool:
        """Wait until the session can serve; False if it closed instead (its attach failed)."""
        if self.ready is not None:
            await asyncio.shield(self.ready)
        return not self.closed

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    def record(self, op: Literal["r", "w"], offset: int, length: int) -> None:
        """Note a block access for BlocksRequested (adjacent accesses of one op merge)."""
        if not self.record_blocks:
            return
        if op == "r" and not self.read_once:
            self.read_once = True
            self.mgr.first_read(self, offset, length)
        ext = self._extents
        if ext:
            last = ext[-1]
            if last[3] == op and last[1] + last[2] == offset:
                last[2] += length
                return
        ext.append([int((time.monotonic() - self.started) * 1000), offset, length, op])
        if len(ext) >= self.mgr.settings.events_batch_extents:
            self.flush_extents()
        elif self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.mgr.settings.events_interval_s, self.flush_extents)

    def flush_extents(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if not self._extents:
            return
        batch = [tuple(e) for e in self._extents]
        self._extents = []
        self.mgr.emit(
            BlocksRequested(
                session_id=self.session_id,
                vdisk=self.spec.vdisk,
                version=self.spec.version,
                extents=batch,  # type: ignore[arg-type]
            ),
            self.session_id,
        )


class SessionManager:
    def __init__(self, resolver: SessionResolver, sink: EventSink, settings: StreamSettings):
        self.resolver = resolver
        self.sink = sink
        self.settings = settings
        # The cache service, when this node has one (set by service.py): write caches and
        # non-local stores go through it.
        self.cache: CacheLink | None = None
        self.sessions: dict[str, Session] = {}
        # The opens under way, one per token (tokens come from clients: none is kept after).
        self._opening = KeyedLocks()
        self._emits: set[asyncio.Task[None]] = set()
        # Announced sessions not opened yet (opened one per loop turn by _preparer), and
        # the attaches of those opened.
        self._announced: dict[str, ExportSpec] = {}
        self._preparer: asyncio.Task[None] | None = None
        self._prepares: set[asyncio.Task[None]] = set()
        # Open connection spans of the boots' traces, by (session, protocol, client).
        self._spans: dict[tuple[str, str, str], trace.Span] = {}
        # Every open connection (with or without a session), so shutdown can end them all.
        self.connections: set = set()
        # Why the last open of a token failed, for the client (e.g. "cache node X holding
        # write cache K is not alive"); kept until that token opens.
        self.refusals: dict[str, str] = {}
        # Files for the disk mirrors of write caches, made ahead of the first writes.
        self.spares = SpareFiles(settings.write_cache_dir)
        # Touched by every request: the loop polls a while after it (busy_poll.py).
        self.busy_poll = BusyPoll(settings.busy_poll_s, self.connections)
        # Connections in their handshake per client address, capped (handshake_gate.py).
        self.handshakes = HandshakeGate(settings.max_handshakes_per_address)

    async def acquire(self, token: str, *, ready: bool = True) -> Session | None:
        """The session of ``token`` with one more connection on it; None for unknown tokens
        (or when opening it failed). ``ready=False``: an announced session may still be
        attaching (``Session.ready``): the caller serves no request before it is."""
        session = await self._open(token, None)
        if session is None:
            return None
        if ready and not await session.wait_ready():
            return None
        if session._linger is not None:
            session._linger.cancel()
            session._linger = None
        if session.announced:
            # Opened ahead of its client: the boot's clock (BlocksRequested times, the first
            # read's span) starts now, when the client arrives.
            session.announced = False
            session.started, session.started_ns = time.monotonic(), time.time_ns()
        session.connections += 1
        return session

    def prepare(self, token: str, spec: ExportSpec) -> None:
        """Open a session the registry announced, before its client connects: the write
        cache is placed and its files made while the client still fetches its boot script.
        In the background; a failure is logged and the client's connection tries again.

        Announcements queue and are opened one per loop turn, so the connections that
        arrive meanwhile get their handshakes answered between them (a storm's 200
        announcements would otherwise build 200 stacks before the loop reads a socket);
        a client whose announcement is still queued has it opened at once."""
        self._announced[token] = spec
        if self._preparer is None:
            self._preparer = asyncio.get_running_loop().create_task(self._prepare_queued())

    async def _prepare_queued(self) -> None:
        try:
            while self._announced:
                token = next(iter(self._announced))
                self._start_prepared(token, self._announced.pop(token))
                await asyncio.sleep(0)  # the sockets' turn
        finally:
            self._preparer = None

    def _start_prepared(self, token: str, spec: ExportSpec) -> Session | None:
        """Build an announced session's stack and register it (``ready`` pending); its
        attach goes on in the background. None if it cannot be built, or if a connection
        is opening the token itself (it got there first)."""
        if token in self.sessions or self._opening.busy(token):
            return self.sessions.get(token)
        try:
            backend = build_stack(spec, self.settings, self.cache, self.spares)
        except (OSError, ValueError) as e:
            log.error("cannot open announced session %s: %s", spec.session_id, e)
            return None
        session = Session(token, spec, backend, self)
        session.announced = True
        loop = asyncio.get_running_loop()
        session.ready = loop.create_future()
        self.sessions[token] = session
        session._linger = loop.call_later(
            self.settings.announced_wait_s, self._linger_expired, session
        )
        task = loop.create_task(self._attach_prepared(session))
        self._prepares.add(task)
        task.add_done_callback(self._prepares.discard)
        return session

    async def _attach_prepared(self, session: Session) -> None:
        """Attach an announced session (a client connecting meanwhile gets the session at
        once: NBD answers its handshake and its requests wait for ``ready``)."""
        backend, ready = session.backend, session.ready
        assert ready is not None
        ok = False
        try:
            ok = await self._attach(session.token, session.spec, backend)
        finally:
            session.ready = None
            if session.closed:  # closed while attaching: close() left the stack to us
                backend.close()
            elif not ok:
                self.close(session, "session-unavailable")
            ready.set_result(None)

    async def _open(self, token: str, spec: ExportSpec | None) -> Session | None:
        """The open session of ``token``, opening it if need be (asking the resolver unless
        ``spec`` is given); one open at a time per token, so an announced session and its
        client's first connection share one."""
        queued = self._announced.pop(token, None)
        if queued is not None:  # announced, not opened yet: this connection goes first
            session = self._start_prepared(token, queued)
            if session is not None:
                return session
        async with self._opening.hold(token):
            session = self.sessions.get(token)
            if session is not None:
                return session
            if spec is None:
                try:
                    spec = await self.resolver.resolve(token)
                except Exception:
                    log.exception("resolver failed for a session token")
                    return None
                if spec is None:
                    return None
            try:
                backend = build_stack(spec, self.settings, self.cache, self.spares)
            except (OSError, ValueError) as e:
                log.error("cannot open session %s: %s", spec.session_id, e)
                return None
            try:
                ok = await self._attach(token, spec, backend)
            except BaseException:  # cancelled (shutdown): nothing half-open stays behind
                backend.close()
                raise
            if not ok:
                backend.close()
                return None
            session = Session(token, spec, backend, self)
            self.sessions[token] = session
            return session

    async def _attach(self, token: str, spec: ExportSpec, backend: Backend) -> bool:
        """Attach a built stack to the cache service; False (logged, with the reason kept
        for the client) when that fails."""
        try:
            await attach_stack(backend)
        except OSError as e:
            log.error("cannot attach session %s to the cache service: %s", spec.session_id, e)
            if len(self.refusals) > 1000:
                self.refusals.clear()
            self.refusals[token] = f"session {spec.session_id}: {e.strerror or e}"
            return False
        self.refusals.pop(token, None)
        return True

    def release(self, session: Session) -> None:
        session.connections -= 1
        if session.connections > 0 or session.closed:
            return
        if self.settings.session_linger_s <= 0:
            self.close(session)
        else:
            loop = asyncio.get_running_loop()
            session._linger = loop.call_later(
                self.settings.session_linger_s, self._linger_expired, session
            )

    def _linger_expired(self, session: Session) -> None:
        session._linger = None
        if session.connections == 0:
            self.close(session)

    def close(self, session: Session, reason: str = "session-closed") -> None:
        """Drop a session's state (its write cache with it); its connections end (``reason``)."""
        if session.closed:
            return
        session.closed = True
        session.flush_extents()
        if session._linger is not None:
            session._linger.cancel()
        if self.sessions.get(session.token) is session:
            del self.sessions[session.token]
        for conn in list(session.conns):
            conn.abort(reason)
        if session.ready is None:
            session.backend.close()
        # else: still attaching (announced): _attach_prepared closes the stack when done

    def taken_over(self, key: str, node: str) -> int:
        """Another stream process (on ``node``) attached write cache ``key``: drop this
        node's sessions on it, whose mirrors would no longer see the writes made there (a
        client coming back here within the linger would read stale blocks). Returns how
        many were dropped; their connections end (reason ``session-moved``)."""
        moved = [
            s
            for s in self.sessions.values()
            if isinstance(s.backend, RemoteWriteCache) and s.backend.key == key
        ]
        for s in moved:
            log.warning(
                "session %s: its write cache %s was attached by stream node %s; dropped here "
                "(%d connection(s) ended) so no read comes from a stale mirror",
                s.session_id, key, node, len(s.conns),
            )  # fmt: skip
            self.close(s, "session-moved")
        return len(moved)

    def drop_unused_remote_sessions(self) -> int:
        """This node was cut off from NATS: a notice that another node attached one of its
        sessions' write caches may be lost (takeover.py). Drop the sessions no connection
        uses (lingering, or announced and not claimed yet); their clients reopen them and
        pull their caches again. Returns how many."""
        unused = [
            s
            for s in self.sessions.values()
            if s.connections == 0 and isinstance(s.backend, RemoteWriteCache)
        ]
        for s in unused:
            log.warning(
                "session %s dropped after a NATS outage: another node may have served its "
                "client meanwhile; its next connection opens it again", s.session_id,
            )  # fmt: skip
            self.close(s, "nats-outage")
        return len(unused)

    def holds(self, session_id: str) -> bool:
        """Whether this node has the session (opened or announced)."""
        return any(s.session_id == session_id for s in self._announced.values()) or any(
            s.session_id == session_id for s in self.sessions.values()
        )

    def close_session_id(self, session_id: str) -> bool:
        """Drop the session with this id (the registry closed it); False if not here."""
        for token, spec in list(self._announced.items()):
            if spec.session_id == session_id:  # announced, not opened yet: never will be
                del self._announced[token]
                return True
        for s in list(self.sessions.values()):
            if s.session_id == session_id:
                self.close(s)
                return True
        return False

    def admits(self, session: Session, protocol: Protocol_, peer: str) -> bool:
        """Whether a connection from ``peer`` ("address:port") may use ``session``: only
        the address the session was issued to, when it was issued to one; a refusal is
        logged and recorded (SessionAddressRefused)."""
        want = session.spec.client_addr
        if not want or not self.settings.client_address_check:
            return True
        ip = peer.rsplit(":", 1)[0].strip("[]")
        if ip == want or ip.removeprefix("::ffff:") == want:
            return True
        log.warning(
            "stream: session %s refused a %s connection from %s: it was issued to %s",
            session.session_id, protocol, ip, want,
        )  # fmt: skip
        self.emit(
            SessionAddressRefused(
                session_id=session.session_id,
                stream_node=self.settings.node_id,
                protocol=protocol,
                client_addr=ip,
                expected_addr=want,
            ),
            session.session_id,
        )
        return False

    def attached(self, session: Session, protocol: Protocol_, client_addr: str) -> None:
        if session.spec.traceparent:
            self._spans[(session.session_id, protocol, client_addr)] = tracer.start_span(
                f"{protocol} connection",
                context=context_from_traceparent(session.spec.traceparent),
                attributes={
                    "streamboot.session_id": session.session_id,
                    "streamboot.client_addr": client_addr,
                    "streamboot.stream_node": self.settings.node_id,
                },
            )
        self.emit(
            SessionAttached(
                session_id=session.session_id,
                stream_node=self.settings.node_id,
                protocol=protocol,
                client_addr=client_addr,
            ),
            session.session_id,
        )

    def detached(
        self,
        session: Session,
        protocol: Protocol_,
        client_addr: str,
        bytes_read: int,
        bytes_written: int,
        reason: str,
    ) -> None:
        session.flush_extents()
        span = self._spans.pop((session.session_id, protocol, client_addr), None)
        if span is not None:
            span.set_attribute("streamboot.bytes_read", bytes_read)
            span.set_attribute("streamboot.bytes_written", bytes_written)
            span.set_attribute("streamboot.detach_reason", reason)
            span.end()
        self.emit(
            SessionDetached(
                session_id=session.session_id,
                stream_node=self.settings.node_id,
                protocol=protocol,
                client_addr=client_addr,
                bytes_read=bytes_read,
                bytes_written=bytes_written,
                reason=reason,
            ),
            session.session_id,
        )

    def first_read(self, session: Session, offset: int, length: int) -> None:
        """The boot's first block read through this node: a span from the session's
        arrival here to the read."""
        if session.spec.traceparent:
            tracer.start_span(
                "first read",
                context=context_from_traceparent(session.spec.traceparent),
                start_time=session.started_ns,
                attributes={"streamboot.offset": offset, "streamboot.length": length},
            ).end()

    def emit(self, event: Event, correlation_id: str | None) -> None:
        """Hand an event to the sink without making the data path wait for it."""
        task = asyncio.get_running_loop().create_task(self._emit(event, correlation_id))
        self._emits.add(task)
        task.add_done_callback(self._emits.discard)

    async def _emit(self, event: Event, correlation_id: str | None) -> None:
        try:
            await self.sink.emit(event, correlation_id)
        except Exception:
            log.exception("event sink failed for %s", event.event_type())

    async def drain_events(self) -> None:
        while self._emits:
            await asyncio.gather(*list(self._emits), return_exceptions=True)

    async def close_all(self, sessions: Iterable[Session] | None = None) -> None:
        if sessions is None:  # shutting down: no announced session opens after this
            self._announced.clear()
            tasks = [*self._prepares, *([self._preparer] if self._preparer else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in list(sessions if sessions is not None else self.sessions.values()):
            self.close(s)
        if sessions is None:
            self.spares.close()
        await self.drain_events()
