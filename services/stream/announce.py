"""Sessions announced before their client connects.

When the registry opens a boot session it tells the stream node it placed the session on
(``streamboot.stream.<node>.session.prepare``, body = what ``session.resolve`` answers for the
token, plus the token). The node opens the session at once: the write cache is placed at
the cache service and its files made while the client is still fetching its iPXE script, so
the client's first connection finds the session ready instead of waiting for two round
trips (registry, cache service).

A core NATS publish, not a request: an announcement that is lost, malformed or fails to open
costs only the time it would have saved (the client's first connection opens the session
itself, as without it). The token travels as it already does in ``session.resolve``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.stream.spec import ChapSecrets, ExportSpec
from shared.bus import subject_token
from shared.layer_paths import check_layer_file, check_relative_layer

if TYPE_CHECKING:  # the registry imports this module: not the stream's data path
    from services.stream.sessions import SessionManager

log = logging.getLogger("streamboot.stream.announce")


def prepare_subject(node: str) -> str:
    """The subject only the stream node ``node`` listens on for announced sessions."""
    return f"streamboot.stream.{subject_token(node)}.session.prepare"


def spec_from_record(record: dict[str, Any], vdisk_root: Path | None = None) -> ExportSpec:
    """The export of a session from the registry's ``session.resolve`` answer. Its layers
    must be files of the vdisk's own folder (in ``vdisk_root`` when given; else
    ``LayerPathError``): this node reads local ones itself, and never a file outside a
    vdisk's folder, whoever asks."""
    vdisk = str(record["vdisk"])
    store = record.get("store", "local")
    if store == "local":
        layers = tuple(check_layer_file(p, vdisk, vdisk_root) for p in record["layers"])
    else:
        layers = tuple(Path(check_relative_layer(p, vdisk)) for p in record["layers"])
    return ExportSpec(
        session_id=str(record["session_id"]),
        vdisk=vdisk,
        version=int(record["version"]),
        layers=layers,
        size=int(record["size"]),
        write_cache=record.get("write_cache", "server-ram"),
        read_only=bool(record.get("read_only", False)),
        write_cache_persistence=record.get("write_cache_persistence", "discard"),
        mac=record.get("mac"),
        store=store,
        traceparent=record.get("boot_traceparent"),
        record_blocks=not record.get("replay_of"),
        client_addr=record.get("client_addr"),
        chap=chap_from_record(record.get("chap")),
        initiator_iqn=_optional_text(record.get("initiator_iqn")),
    )


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {type(value).__name__}")
    return value


def chap_from_record(value: Any) -> ChapSecrets | None:
    """The ``chap`` of a resolve answer: None, or a user and secret (and both reverse ones
    or neither), all non-empty strings; anything else is a malformed answer."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("chap is not an object")
    user, secret = _optional_text(value.get("user")), _optional_text(value.get("secret"))
    ruser = _optional_text(value.get("reverse_user"))
    rsecret = _optional_text(value.get("reverse_secret"))
    if user is None or secret is None or (ruser is None) != (rsecret is None):
        raise ValueError("chap needs a user and a secret, and both reverse ones or neither")
    return ChapSecrets(user, secret, ruser, rsecret)


async def announce_session(nc: NATS, node: str, token: str, record: dict[str, Any]) -> None:
    """Tell stream node ``node`` to open the session ``token`` now (``record``: its
    ``session.resolve`` answer)."""
    await nc.publish(prepare_subject(node), json.dumps({**record, "token": token}).encode())


async def listen_for_announcements(nc: NATS, node: str, sessions: SessionManager) -> Subscription:
    """Open every session announced to this node ahead of its client."""

    async def on_announcement(msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            token = body["token"]
            if not isinstance(token, str) or not token:
                raise ValueError("no session token")
            spec = spec_from_record(body, sessions.settings.vdisk_root)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("stream: ignored a malformed session announcement (%s: %s)",
                        type(e).__name__, e)  # fmt: skip
            return
        sessions.prepare(token, spec)  # in the background: announcements never queue

    return await nc.subscribe(prepare_subject(node), cb=on_announcement)
