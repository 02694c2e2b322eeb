"""The message bus: NATS connections, the JetStream event stream, and JSON request/reply.

Subjects (the whole map lives here so nobody invents a second one):
- ``events.<Type>.<kind>``       JetStream stream EVENTS_STREAM: every event, after it is in the log
- ``streamboot.events.append.<service>``  request/reply to the registry: append events to the
  log; the last token names the appending service, which the bus's permissions make true
- ``streamboot.registry.<verb>``  request/reply: registry commands and queries
- ``streamboot.cache.<verb>``     request/reply: cache commands (raw nats-py, data plane)
- ``streamboot.cache.node.<node>.<verb>``  the same, to one cache node (shared/contracts/cache/wire.py)
- ``streamboot.cache.wc.attached``  publish, every stream node: a write cache was attached
  (services/stream/takeover.py)
- ``streamboot.stream.<node>.session.prepare``  publish: a session announced to its stream
  node ahead of its client (services/stream/announce.py)
- heartbeats: the JetStream KV bucket HEARTBEAT_BUCKET, key ``<service>.<node>``
- which cache node holds which write cache: KV ``streamboot_cache_owners``
  (services/cache/placement.py)

Who may publish and subscribe which of them (one NATS user per role): shared/bus_access.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared import metrics
from shared.settings import Settings, without_password
from shared.telemetry import extract_context, inject_headers

log = logging.getLogger("streamboot.bus")

EVENTS_STREAM = "STREAMBOOT_EVENTS"
EVENTS_SUBJECTS = "events.>"
# JetStream drops a re-published event id within this window; the relay's restarts fall
# well inside it, and consumers dedupe by event id for anything older.
EVENTS_DUPLICATE_WINDOW_S = 24 * 3600
APPEND_PREFIX = "streamboot.events.append"
# The services that append over the bus; the registry appends its own events in process.
APPENDING_SERVICES = ("boot", "stream", "cache")


def append_subject(service: str) -> str:
    """Where ``service`` sends its events: one subject per service, so the registry knows
    (and the bus's permissions guarantee) who appended."""
    if service not in APPENDING_SERVICES:
        raise ValueError(f"{service!r} does not append events over the bus")
    return f"{APPEND_PREFIX}.{service}"


HEARTBEAT_BUCKET = "streamboot_heartbeats"


class BusError(Exception):
    """A request over the bus failed; the message says which service and why."""


class ServiceUnavailable(BusError):
    pass


RECONNECT_WAIT_S = 0.5
DRAIN_TIMEOUT_S = 5.0
# While NATS stays unreachable nats-py reports every failed reconnect (one per
# RECONNECT_WAIT_S): the first is logged, then one line this often, saying for how long
# and how many attempts.
OUTAGE_LOG_EVERY_S = 30.0


class ConnectionLog:
    """What a service logs about its NATS connection: each loss and recovery (with how long
    it was down), other errors at once, an outage's failed reconnects at a bounded rate."""

    def __init__(self, name: str, url: str, on_reconnect: Callable[[], None] | None) -> None:
        self.name, self.url, self.on_reconnect = name, url, on_reconnect
        self.client: NATS | None = None
        self.down_since: float | None = None  # loop time of the loss, while it lasts
        self.failed = 0  # reconnects failed in this outage
        self.refused = asyncio.Event()  # the server refused the first login
        self.logged_at = 0.0

    async def disconnected(self) -> None:
        # A close we asked for also reports a disconnect: only a lost connection is news.
        nc = self.client
        if nc is None or nc.is_closed or nc.is_draining:
            return
        self.down_since, self.failed = asyncio.get_running_loop().time(), 0
        log.warning("%s: disconnected from NATS %s; reconnecting", self.name, self.url)

    async def reconnected(self) -> None:
        if self.down_since is None:
            log.warning("%s: reconnected to NATS %s", self.name, self.url)
        else:
            down = asyncio.get_running_loop().time() - self.down_since
            log.warning(
                "%s: reconnected to NATS %s after %.1fs (%d failed attempts)",
                self.name, self.url, down, self.failed,
            )  # fmt: skip
        self.down_since = None
        if self.on_reconnect is not None:
            self.on_reconnect()

    async def error(self, exc: Exception) -> None:
        if self.client is None and "authorization violation" in str(exc).lower():
            self.refused.set()  # the first connection's login: `connect` says so, once
            return
        if self.down_since is None:
            log.error("%s: NATS error: %s", self.name, exc)
            return
        self.failed += 1
        now = asyncio.get_running_loop().time()
        if self.failed == 1 or now - self.logged_at >= OUTAGE_LOG_EVERY_S:
            self.logged_at = now
            log.error(
                "%s: NATS %s unreachable for %.0fs (%d failed reconnects, trying every "
                "%gs): %s", self.name, self.url, now - self.down_since, self.failed,
                RECONNECT_WAIT_S, exc,
            )  # fmt: skip


async def follow_forever(follow: Callable[[], Awaitable[None]], what: str, pause_s: float) -> None:
    """Run a follower (a KV watch, a consumer) forever: when it returns, or fails (said
    in the log), start it again ``pause_s`` later."""
    while True:
        try:
            await follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed (%s); following again", what, exc)
        await asyncio.sleep(pause_s)


async def connect(
    url: str,
    name: str,
    *,
    credentials: tuple[str, str] | None = None,
    connect_timeout_s: float = 30.0,
    on_reconnect: Callable[[], None] | None = None,
) -> NATS:
    """Connect to NATS, retrying with backoff until ``connect_timeout_s``; once connected,
    nats-py reconnects forever and :class:`ConnectionLog` says what happens. ``on_reconnect``
    is called after each reconnection (what was published meanwhile is lost to this client).

    ``credentials``: (user, password) of this process's role (``Settings.nats_credentials``,
    shared/bus_access.py); they win over any given in the URL. A refused login is not
    retried: it would be refused again."""
    shown = without_password(url)
    events = ConnectionLog(name, shown, on_reconnect)
    user, password = credentials or (None, None)
    delay = 0.1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout_s
    while True:
        try:
            # nats-py retries a first connection forever when reconnects are unlimited:
            # bound each attempt ourselves.
            attempt = nats.connect(
                # Several seed servers of a cluster may be given, comma-separated.
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT_S,
                disconnected_cb=events.disconnected,
                reconnected_cb=events.reconnected,
                error_cb=events.error,
                allow_reconnect=True,
                connect_timeout=2,
                # A stopping service drains its connection: bounded well inside the usual
                # stop grace (compose: 10 s), not nats-py's 30 s.
                drain_timeout=DRAIN_TIMEOUT_S,
                user=user,
                password=password,
            )
            nc = await _first_of(
                attempt, events.refused, max(0.5, min(5.0, deadline - loop.time()))
            )
            if nc is None:
                who = f"user {user!r}" if user else "no credentials"
                raise BusError(
                    f"NATS at {shown} refused the login ({who}): set STREAMBOOT_NATS_USER "
                    "and STREAMBOOT_NATS_PASSWORD (see docs/security.md), or start it with "
                    "`streamboot up`"
                )
            events.client = nc
            return nc
        except BusError:
            raise
        except Exception as exc:
            if loop.time() + delay > deadline:
                raise BusError(
                    f"cannot reach NATS at {shown}: "
                    f"{str(exc) or 'no connection within the timeout'}"
                ) from exc
            log.warning(
                "%s: NATS at %s not reachable (%s); retrying in %.1fs", name, shown, exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _first_of(
    attempt: Awaitable[NATS], refused: asyncio.Event, timeout_s: float
) -> NATS | None:
    """The connection, or None as soon as the login is refused (nats-py would go on
    trying); TimeoutError after ``timeout_s``."""
    connecting = asyncio.ensure_future(attempt)
    refusal = asyncio.ensure_future(refused.wait())
    try:
        done, _ = await asyncio.wait(
            {connecting, refusal}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refusal.cancel()
    if connecting in done:
        return connecting.result()
    connecting.cancel()
    await asyncio.wait({connecting})  # its cancellation done; its error is ours to drop
    if not connecting.cancelled() and connecting.exception() is None:
        await connecting.result().close()  # connected just as it was cancelled
    if refused.is_set():
        return None
    raise TimeoutError


async def ensure_event_stream(js: JetStreamContext) -> None:
    """Create (or keep) the JetStream stream that carries every event."""
    config = StreamConfig(
        name=EVENTS_STREAM,
        subjects=[EVENTS_SUBJECTS],
        num_replicas=jetstream_replicas(),
        storage=StorageType.FILE,
        duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
        max_age=7 * 24 * 3600,
    )
    try:
        await js.stream_info(EVENTS_STREAM)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Another process created it between our two calls.
            await js.stream_info(EVENTS_STREAM)


def jetstream_replicas() -> int:
    """How many servers hold each stream and KV bucket streamboot creates: 1 on one
    server, 3 on a three-node cluster (``STREAMBOOT_NATS_REPLICAS``, docs/deploy.md).
    Read when a stream or bucket is created, which is rare: an existing one keeps its own."""
    return Settings().nats_replicas


async def key_value_bucket(js: JetStreamContext, name: str, ttl_s: float | None) -> KeyValue:
    """A JetStream KV bucket (one value per key, entries expire after ``ttl_s``; None:
    never), created on first use by whichever process gets there first."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        config = KeyValueConfig(bucket=name, history=1, ttl=ttl_s, replicas=jetstream_replicas())
        try:
            return await js.create_key_value(config)
        except BadRequestError:
            return await js.key_value(name)  # created by another process meanwhile


_UNSAFE_IN_SUBJECT = re.compile(r"[^A-Za-z0-9-]")


def subject_token(text: str) -> str:
    """A NATS subject token / KV key for any text: every character but ``[A-Za-z0-9-]`` as
    ``_XX`` (its code, hex). Injective, so two names never share a token."""
    return _UNSAFE_IN_SUBJECT.sub(lambda m: "".join(f"_{b:02X}" for b in m.group().encode()), text)


def encode(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


async def request_json(nc: NATS, subject: str, payload: Any, *, timeout_s: float = 5.0) -> Any:
    """Request/reply with JSON bodies and the current trace context in the headers.

    A reply ``{"error": ..., "kind": ...}`` is raised as :class:`RemoteError`."""
    try:
        with metrics.time_request(metrics.process_service(), f"call:{subject}"):
            msg = await nc.request(
                subject, encode(payload), timeout=timeout_s, headers=inject_headers()
            )
    except NoRespondersError as exc:
        raise ServiceUnavailable(f"no service answers on {subject!r} (is it running?)") from exc
    except NatsTimeoutError as exc:
        raise ServiceUnavailable(f"no reply on {subject!r} within {timeout_s}s") from exc
    body = json.loads(msg.data or b"null")
    if isinstance(body, dict) and "error" in body:
        raise RemoteError(body["error"], body.get("kind", "error"), body.get("detail"))
    return body


class Requests:
    """Request/reply over one inbox subscription of this connection, for the data plane:
    a counter names each request's reply subject and a timer bounds it.

    Same errors as ``nc.request`` (NoRespondersError, nats' TimeoutError), for less: it
    spends a NUID, ``os.urandom`` and ``asyncio.wait_for`` per request. Measured, 20,000
    sequential 4 KiB requests to an echo process: 131-144 us of the caller's CPU per
    request with ``nc.request``, 87-98 us this way (wall 271-300 against 210-232 us)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._inbox = ""  # "<inbox>." once subscribed
        self._subscribing: asyncio.Lock | None = None
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._next = itertools.count()

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> Msg:
        if not self._inbox:
            await self._subscribe()
        reply = f"{self._inbox}{next(self._next)}"
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Msg] = loop.create_future()
        self._pending[reply] = answer
        timer = loop.call_later(timeout_s, _time_out, answer)
        try:
            await self.nc.publish(subject, payload, reply=reply)
            msg = await answer
        finally:
            timer.cancel()
            self._pending.pop(reply, None)
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            raise NoRespondersError
        return msg

    async def _subscribe(self) -> None:
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        async with self._subscribing:
            if not self._inbox:
                inbox = self.nc.new_inbox() + "."
                await self.nc.subscribe(inbox + "*", cb=self._on_reply)
                self._inbox = inbox

    async def _on_reply(self, msg: Msg) -> None:
        answer = self._pending.pop(msg.subject, None)
        if answer is not None and not answer.done():
            answer.set_result(msg)


def _time_out(answer: asyncio.Future[Msg]) -> None:
    if not answer.done():
        answer.set_exception(NatsTimeoutError())


class RemoteError(BusError):
    """The service answered with an error; ``kind`` tells the caller what to do."""

    def __init__(self, message: str, kind: str = "error", detail: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


Handler = Callable[[Any, Msg], Awaitable[Any]]


_concurrent: set[asyncio.Task[None]] = set()


def connection_mark(nc: NATS) -> int:
    """Which connection to the server this client is on (nats-py counts reconnects)."""
    return int(nc.stats["reconnects"])


async def respond(msg: Msg, data: bytes, mark: int) -> None:
    """Answer a request that arrived on connection ``mark``, unless that connection is gone.

    A reply published while reconnecting (nats-py buffers it) or after reaches a server that
    did not deliver the request, which refuses it as a permission violation
    (``allow_responses``); the requester, whose request went unanswered, asks again."""
    nc: NATS = msg._client  # the connection the message came on
    if not nc.is_connected or connection_mark(nc) != mark:
        log.info("reply on %s dropped: the bus connection the request came on is gone", msg.subject)
        return
    await msg.respond(data)


async def serve_json(
    nc: NATS, subject: str, handler: Handler, *, queue: str = "", concurrent: bool = False
) -> Any:
    """Answer requests on a subject with a JSON handler (raw nats-py, for the hot paths).

    Exceptions become error replies, never a silent timeout at the caller. A subscription
    handles its messages one at a time; ``concurrent`` runs each in its own task instead
    (for handlers that wait on other services)."""
    from opentelemetry import context as otel_context

    async def on_msg(msg: Msg) -> None:
        mark = connection_mark(nc)
        token = otel_context.attach(extract_context(msg.headers))
        try:
            try:
                with metrics.time_request(metrics.process_service(), f"serve:{subject}"):
                    result = await handler(json.loads(msg.data or b"null"), msg)
            except RemoteError as exc:
                result = {"error": str(exc), "kind": exc.kind, "detail": exc.detail}
            except Exception as exc:
                log.exception("handler for %s failed", subject)
                result = {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}
            if msg.reply:
                reply = encode(result)
                if len(reply) > nc.max_payload:
                    # nats-py would raise in respond() and the caller wait for its timeout.
                    message = (
                        f"the answer to {subject} is {len(reply)} bytes, more than NATS "
                        f"takes in one message (max_payload {nc.max_payload})"
                    )
                    log.error("%s", message)
                    reply = encode({"error": message, "kind": "too_big"})
                await respond(msg, reply, mark)
        finally:
            otel_context.detach(token)

    if not concurrent:
        return await nc.subscribe(subject, queue=queue, cb=on_msg)

    async def spawn(msg: Msg) -> None:
        task = asyncio.get_running_loop().create_task(on_msg(msg))
        _concurrent.add(task)
        task.add_done_callback(_concurrent.discard)

    return await nc.subscribe(subject, queue=queue, cb=spawn)
