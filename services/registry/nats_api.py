"""The registry's control-plane handlers on NATS (FastStream request/reply). The subjects,
bodies and error kinds are the contract in ``shared/contracts/registry.py``.

Each handler is one call into :class:`~services.registry.app.RegistryApp`, the same layer
the REST API calls. Session opens, which come in storms, are served by raw nats-py
(:func:`serve_session_opens`): FastStream's per-message plumbing (its dependency
injection, middlewares and the consumer and reply spans of its telemetry) cost the
registry more CPU per open than the open itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from faststream.nats import NatsBroker, NatsUserPassword
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.registry.app import RegistryApp
from services.registry.domain.errors import DomainError
from shared.bus import RemoteError, serve_json
from shared.contracts.registry import OPEN, PREFIX, QUEUE

log = logging.getLogger("streamboot.registry.nats")


class _WithoutTaskCallbackNotes(logging.Filter):
    """Drops FastStream's INFO note that a subscriber task's done-callback runs: one line
    per worker at every stop, nothing an operator acts on (a failed task is logged apart)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO and record.getMessage().endswith(" is being executed...")
        )


log.addFilter(_WithoutTaskCallbackNotes())

# Session opens from many booting clients at once: handle them concurrently (the app
# serialises the decisions itself).
WORKERS = 16
# Replay session opens: enough at once that a burst reaches the app's group commit and its
# back-pressure (which sees how long each waited) instead of queueing unseen in the broker,
# where one could start after its caller gave up.
OPEN_WORKERS = 2048

Reply = dict[str, Any] | list[Any]


def error_reply(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, DomainError):
        if exc.retry_after_s is not None:
            detail = {"retry_after_s": exc.retry_after_s}
            return {"error": str(exc), "kind": exc.kind, "detail": detail}
        return {"error": str(exc), "kind": exc.kind}
    log.exception("registry handler failed")
    return {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}


def _replying(fn: Callable[[dict[str, Any]], Awaitable[Reply]]) -> Callable[..., Awaitable[Reply]]:
    """Errors become error replies: a caller never waits for a timeout to learn of them.

    FastStream passes the message by the parameter's name, which it reads from the
    signature (following ``__wrapped__``): the wrapper keeps its own (``body``) so every
    handler is called the same way whatever it names its argument."""

    async def wrapper(body: dict[str, Any]) -> Reply:
        try:
            return await fn(body or {})
        except Exception as exc:
            return error_reply(exc)

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    return wrapper


def build_broker(
    nats_url: str, app: RegistryApp, credentials: tuple[str, str] | None = None
) -> NatsBroker:
    broker = NatsBroker(
        nats_url,
        security=NatsUserPassword(*credentials) if credentials else None,
        name="streamboot-registry",
        middlewares=[NatsTelemetryMiddleware()],
        max_reconnect_attempts=-1,
        graceful_timeout=5.0,
        # Per-message access logs at DEBUG: a boot storm must not flood the log.
        log_level=logging.DEBUG,
        # The service's own logger (its format, no colour codes): FastStream's default
        # handler writes ANSI colours even into a redirected log.
        logger=log,
    )

    def handle(
        verb: str, workers: int = WORKERS
    ) -> Callable[[Callable[..., Awaitable[Reply]]], Any]:
        def register(fn: Callable[[dict[str, Any]], Awaitable[Reply]]) -> Any:
            return broker.subscriber(f"{PREFIX}.{verb}", queue=QUEUE, max_workers=workers)(
                _replying(fn)
            )

        return register

    @handle("session.resolve")
    async def session_resolve(body: dict[str, Any]) -> Reply:
        return await app.resolve(str(body.get("token", "")))

    @handle("session.nodes")
    async def session_nodes(body: dict[str, Any]) -> Reply:
        return await app.session_nodes(str(body.get("token", "")))

    @handle("session.replay", OPEN_WORKERS)
    async def session_replay(body: dict[str, Any]) -> Reply:
        return await app.open_replay_session(
            str(body.get("session_id", "")), stream_node=body.get("stream_node")
        )

    @handle("session.close")
    async def session_close(body: dict[str, Any]) -> Reply:
        key = body.get("token") or body.get("session_id") or ""
        return await app.close_session(str(key), body.get("reason") or "closed-by-request")

    @handle("session.list")
    async def session_list(_body: dict[str, Any]) -> Reply:
        return app.list_sessions()

    @handle("session.status")
    async def session_status(body: dict[str, Any]) -> Reply:
        return await app.session_status(str(body.get("session_id", "")))

    @handle("device.lookup")
    async def device_lookup(body: dict[str, Any]) -> Reply:
        return await app.lookup_device(body.get("mac"), body.get("smbios_uuid"))

    @handle("vdisk.list")
    async def vdisk_list(_body: dict[str, Any]) -> Reply:
        return app.list_vdisks()

    return broker


async def serve_session_opens(nc: NATS, app: RegistryApp) -> Any:
    """``session.open`` on ``nc`` (the registry's queue group): each request in a task of
    its own, so a storm's opens all reach the app's group commit and its back-pressure;
    the caller's trace context (its headers) is the parent of the open's span."""

    async def session_open(body: Any, _msg: Msg) -> Reply:
        if not isinstance(body, dict):
            raise RemoteError("a session open is a JSON object", "invalid")
        try:
            reply = await app.open_session(
                body.get("mac"),
                smbios_uuid=body.get("smbios_uuid"),
                vdisk=body.get("vdisk"),
                maintenance=bool(body.get("maintenance", False)),
                correlation_id=body.get("correlation_id"),
                boot_traceparent=body.get("boot_traceparent"),
                boot_started_ns=body.get("boot_started_ns"),
                client_addr=body.get("client_addr"),
            )
        except DomainError as exc:
            e = error_reply(exc)
            raise RemoteError(e["error"], e["kind"], e.get("detail")) from None
        # The boot service writes the device's CHAP credentials into an iSCSI boot's
        # script; the REST API's answer never carries them.
        chap = app.chap_record(reply.get("mac"))
        return {**reply, "chap": chap.model_dump() if chap else None}

    return await serve_json(nc, OPEN, session_open, queue=QUEUE, concurrent=True)
