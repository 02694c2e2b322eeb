"""Appending to the event log over the bus.

Only the registry touches PostgreSQL. Every other service hands its events to
:class:`EventClient`, which sends them to the registry's append handler
(:func:`serve_appends`) and returns once they are in the log. The client keeps unsent events
in order and retries with backoff while the registry or NATS is away, so an event that a
service produced is not dropped because of a restart somewhere else (the registry's, NATS's
or PostgreSQL's: an append that finds PostgreSQL away is answered "unavailable" and sent
again); the event id makes the retries idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.bus import (
    APPEND_PREFIX,
    APPENDING_SERVICES,
    BusError,
    RemoteError,
    append_subject,
    request_json,
    serve_json,
)
from shared.contracts import registry as registry_contract
from shared.envelope import Envelope
from shared.event_owners import Refused, admit
from shared.event_store import ConcurrencyError, EventStore, unreachable
from shared.events import Event, envelope
from shared.telemetry import current_traceparent

log = logging.getLogger("streamboot.event_log")

# The error kind of an append that may succeed if sent again: the log's database is away.
UNAVAILABLE = "unavailable"


async def serve_appends(
    nc: NATS,
    store: EventStore,
    on_appended: Callable[[list[Envelope]], None] | None = None,
) -> Any:
    """The registry's handler for ``streamboot.events.append.<service>`` (a queue group:
    replicas share). The subject's last token names the appending service.

    Request: ``{"events": [Envelope...], "expected": {stream_id: version} | null}``.
    Reply: ``{"positions": [...], "versions": [...]}`` or an error with kind ``conflict``,
    ``forbidden`` (an event type the caller does not own) or ``invalid`` (not a well-formed
    event of its type): every event is checked (shared/event_owners.py) before any is
    stored, so a refused batch leaves nothing in the log.
    """

    async def handle(body: Any, msg: Msg) -> dict[str, Any]:
        caller = msg.subject.rsplit(".", 1)[-1]
        if caller not in APPENDING_SERVICES:
            raise RemoteError(f"{caller[:100]!r} may not append events", "forbidden")
        raw = body.get("events") if isinstance(body, dict) else None
        expected = body.get("expected") if isinstance(body, dict) else None
        if not isinstance(raw, list) or not (expected is None or isinstance(expected, dict)):
            raise RemoteError("an append is {events: [...], expected: {...} | null}", "invalid")
        try:
            events = [admit(caller, e) for e in raw]
        except Refused as exc:
            log.warning("event log: refused %d event(s) from %s: %s", len(raw), caller, exc)
            raise RemoteError(str(exc), exc.kind) from None
        try:
            stored = await store.append(events, expected=expected)
        except ConcurrencyError as exc:
            raise RemoteError(str(exc), "conflict", {"actual": exc.actual}) from exc
        except Exception as exc:
            if not unreachable(exc):
                raise
            # PostgreSQL restarting: the client sends the same events again (same ids).
            raise RemoteError(f"the event log is unavailable: {exc}", UNAVAILABLE) from exc
        if on_appended is not None:
            on_appended(stored)
        return {
            "positions": [e.position for e in stored],
            "versions": [e.version for e in stored],
        }

    return await serve_json(nc, f"{APPEND_PREFIX}.*", handle, queue="registry")


SESSION_STATUS_SUBJECT = registry_contract.STATUS


# How long a consumer waits for the registry to confirm a close before it tries again.
CLOSED_CONFIRM_TIMEOUT_S = 5.0


async def closed_in_log(
    nc: NATS, session_id: str, *, timeout_s: float = CLOSED_CONFIRM_TIMEOUT_S
) -> bool:
    """Whether the log holds the close of this session (the registry reads it there). A
    consumer told of a SessionClosed asks this before it destroys anything of the session:
    the message alone proves nothing. Raises BusError when the registry cannot say."""
    reply = await request_json(
        nc, SESSION_STATUS_SUBJECT, {"session_id": session_id}, timeout_s=timeout_s
    )
    return bool(reply.get("closed"))


class EventClient:
    """Emits a service's events into the log (through the registry's append handler)."""

    def __init__(
        self, nc: NATS, service: str, *, timeout_s: float = 5.0, max_backoff_s: float = 5.0
    ) -> None:
        self._nc = nc
        self._subject = append_subject(service)
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s

    async def emit(
        self,
        event: Event,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        expected_version: int | None = None,
        retry_for_s: float = 30.0,
    ) -> Envelope:
        env = envelope(
            event,
            correlation_id=correlation_id,
            causation_id=causation_id,
            traceparent=current_traceparent(),
        )
        expected = {env.stream_id: expected_version} if expected_version is not None else None
        [stored] = await self.append([env], expected=expected, retry_for_s=retry_for_s)
        return stored

    async def append(
        self,
        events: Sequence[Envelope],
        *,
        expected: dict[str, int] | None = None,
        retry_for_s: float = 30.0,
    ) -> list[Envelope]:
        """Append, retrying on unavailability for up to ``retry_for_s``; a conflict is raised
        at once (the caller must re-decide), anything else after the retries run out."""
        payload = {"events": [e.model_dump(mode="json") for e in events], "expected": expected}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = 0.1
        while True:
            try:
                reply = await request_json(
                    self._nc, self._subject, payload, timeout_s=self._timeout_s
                )
                return [
                    e.model_copy(update={"position": p, "version": v})
                    for e, p, v in zip(events, reply["positions"], reply["versions"], strict=True)
                ]
            except BusError as exc:
                if isinstance(exc, RemoteError) and exc.kind != UNAVAILABLE:
                    raise
                if loop.time() + delay > deadline:
                    raise
                log.warning("event log not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
