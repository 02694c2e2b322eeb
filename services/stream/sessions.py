"""Sessions on this stream node: one backend stack per session token, shared by connections.

Every connection that names the same token gets the same :class:`Session`, hence the same
write cache object: a write on one connection is read back on another, and a flush covers
all of them (what NBD_FLAG_CAN_MULTI_CONN promises). A session outlives its last connection
by ``session_linger_s``; then its stack (and a server-side write cache) is dropped.

The :class:`SessionManager` is the one owner of a session's lifecycle: it opens it (from a
client's token through the resolver, or from an announcement), attaches its stack, counts
its connections, lets it linger, and closes it (idle, closed by the registry, taken over
by another node, or dropped after a NATS outage). The other jobs live beside it: one
session's state and block-access record (``session.py``), the queue of announced sessions
(``announced.py``), the stack's assembly (``path/stack.py``), events and spans
(``session_events.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from services.stream.announced import AnnounceQueue
from services.stream.busy_poll import BusyPoll
from services.stream.path.backend import Backend
from services.stream.path.cached_store import CacheLink
from services.stream.path.spare_files import SpareFiles
from services.stream.path.stack import build_stack
from services.stream.session import Session
from services.stream.session_events import Protocol_, SessionEvents
from services.stream.settings import StreamSettings
from services.stream.spec import EventSink, ExportSpec, SessionResolver
from shared.address_cap import AddressCap, peer_host
from shared.keyed_locks import KeyedLocks
from shared.log_budget import LogBudget

__all__ = ["Protocol_", "Session", "SessionManager"]

log = logging.getLogger(__name__)

# What a client is told when its token opens nothing and no other reason is known.
UNKNOWN_TOKEN = "no live session has this token (closed, expired or never opened)"


class SessionManager:
    def __init__(self, resolver: SessionResolver, sink: EventSink, settings: StreamSettings):
        self.resolver = resolver
        self.sink = sink
        self.settings = settings
        self.events = SessionEvents(sink, settings.node_id)
        # The cache service, when this node has one (set by service.py): write caches and
        # non-local stores go through it.
        self.cache: CacheLink | None = None
        self.sessions: dict[str, Session] = {}
        # The opens under way, one per token (tokens come from clients: none is kept after).
        self._opening = KeyedLocks()
        # Announced sessions not opened yet, and the attaches of those opened.
        self._announced = AnnounceQueue(self._start_prepared)
        self._prepares: set[asyncio.Task[None]] = set()
        # Every open connection (with or without a session), so shutdown can end them all.
        self.connections: set = set()
        # Why the last open of a token failed, for the client (e.g. "cache node X holding
        # write cache K is not alive"); kept until that token opens.
        self.refusals: dict[str, str] = {}
        # Refused opens and addresses are logged, a line each within a budget: anyone who
        # reaches the port can make them.
        self.refusal_log = LogBudget(log, "stream refusals")
        # Files for the disk mirrors of write caches, made ahead of the first writes.
        self.spares = SpareFiles(settings.write_cache_dir)
        # Touched by every request: the loop polls a while after it (busy_poll.py).
        self.busy_poll = BusyPoll(settings.busy_poll_s, self.connections)
        # Connections in their handshake per client address, capped (shared/address_cap.py).
        self.handshakes = AddressCap(
            settings.max_handshakes_per_address,
            log,
            "stream",
            "connections in their handshake",
            total=settings.max_handshakes,
        )

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
        In the background, paced (announced.py); a failure is logged and the client's
        connection tries again."""
        self._announced.add(token, spec)

    def _start_prepared(self, token: str, spec: ExportSpec) -> Session | None:
        """Build an announced session's stack and register it (``ready`` pending); its
        attach goes on in the background. None if it cannot be built, or if a connection
        is opening the token itself (it got there first)."""
        if token in self.sessions or self._opening.busy(token):
            return self.sessions.get(token)
        try:
            stack = build_stack(spec, self.settings, self.cache, self.spares)
        except (OSError, ValueError) as e:
            log.error("cannot open announced session %s: %s", spec.session_id, e)
            return None
        session = Session(token, spec, stack, self.events, self.settings)
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
        queued = self._announced.take(token)
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
                except Exception as e:
                    log.exception("resolver failed for a session token")
                    self._refuse(token, f"the registry did not answer ({type(e).__name__})")
                    return None
                if spec is None:
                    # Not kept: anyone may send made-up tokens.
                    self.refusals.pop(token, None)
                    return None
            try:
                stack = build_stack(spec, self.settings, self.cache, self.spares)
            except (OSError, ValueError) as e:
                log.error("cannot open session %s: %s", spec.session_id, e)
                self._refuse(token, f"session {spec.session_id}: cannot open its layers")
                return None
            try:
                ok = await self._attach(token, spec, stack.top)
            except BaseException:  # cancelled (shutdown): nothing half-open stays behind
                stack.top.close()
                raise
            if not ok:
                stack.top.close()
                return None
            session = Session(token, spec, stack, self.events, self.settings)
            self.sessions[token] = session
            return session

    async def _attach(self, token: str, spec: ExportSpec, backend: Backend) -> bool:
        """Attach a built stack to the cache service; False (logged, with the reason kept
        for the client) when that fails."""
        try:
            await backend.attach()
        except OSError as e:
            log.error("cannot attach session %s to the cache service: %s", spec.session_id, e)
            self._refuse(token, f"session {spec.session_id}: {e.strerror or e}")
            return False
        self.refusals.pop(token, None)
        return True

    def _refuse(self, token: str, why: str) -> None:
        if len(self.refusals) > 1000:
            self.refusals.clear()
        self.refusals[token] = why

    def refusal(self, token: str) -> str:
        """Why ``token`` opens nothing here, for the client and the log."""
        return self.refusals.get(token) or UNKNOWN_TOKEN

    def refused(self, protocol: Protocol_, peer: str, why: str) -> None:
        """Log a refused export (within the refusal budget): a client that cannot attach
        shows in this node's log, with the reason it was told."""
        ip = peer_host(peer)
        self.refusal_log.log(
            logging.WARNING, "export", ip, "stream: refused a %s export to %s: %s",
            protocol, peer, why,
        )  # fmt: skip

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
        moved = [s for s in self.sessions.values() if s.remote_key == key]
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
            s for s in self.sessions.values() if s.connections == 0 and s.remote_key is not None
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
        return self._announced.holds(session_id) or any(
            s.session_id == session_id for s in self.sessions.values()
        )

    def close_session_id(self, session_id: str) -> bool:
        """Drop the session with this id (the registry closed it); False if not here."""
        if self._announced.discard(session_id):  # announced, not opened yet: never will be
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
        ip = peer_host(peer)
        if ip == want or ip.removeprefix("::ffff:") == want:
            return True
        self.refusal_log.log(
            logging.WARNING, "address", ip,
            "stream: session %s refused a %s connection from %s: it was issued to %s",
            session.session_id, protocol, ip, want,
        )  # fmt: skip
        self.events.address_refused(session.session_id, protocol, ip, want)
        return False

    def attached(
        self, session: Session, protocol: Protocol_, client_addr: str, boot_firmware: bool = False
    ) -> None:
        self.events.attached(
            session.session_id, session.spec.traceparent, protocol, client_addr, boot_firmware
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
        self.events.detached(
            session.session_id, protocol, client_addr, bytes_read, bytes_written, reason
        )

    async def drain_events(self) -> None:
        await self.events.drain()

    async def close_all(self, sessions: Iterable[Session] | None = None) -> None:
        if sessions is None:  # shutting down: no announced session opens after this
            pacer = self._announced.stop()
            tasks = [*self._prepares, *([pacer] if pacer else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in list(sessions if sessions is not None else self.sessions.values()):
            self.close(s)
        if sessions is None:
            self.spares.close()
        await self.drain_events()
