"""The stream node's side of announced sessions (the contract: shared/contracts/stream.py):
open every session the registry announces to this node ahead of its client, and build a
session's export from its registry record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.stream.spec import ChapSecrets, ExportSpec
from shared.contracts.registry import ChapRecord, SessionRecord
from shared.contracts.stream import parse_announcement, prepare_subject
from shared.layer_paths import check_layer_file, check_relative_layer

if TYPE_CHECKING:
    from services.stream.sessions import SessionManager

__all__ = ["listen_for_announcements", "prepare_subject", "spec_from_record"]

log = logging.getLogger("streamboot.stream.announce")


def spec_from_record(
    record: SessionRecord | Mapping[str, Any], vdisk_root: Path | None = None
) -> ExportSpec:
    """The export of a session from the registry's ``session.resolve`` answer. Its layers
    must be files of the vdisk's own folder (in ``vdisk_root`` when given; else
    ``LayerPathError``): this node reads local ones itself, and never a file outside a
    vdisk's folder, whoever asks."""
    r = record if isinstance(record, SessionRecord) else SessionRecord.model_validate(record)
    if r.store == "local":
        layers = tuple(check_layer_file(p, r.vdisk, vdisk_root) for p in r.layers)
    else:
        layers = tuple(Path(check_relative_layer(p, r.vdisk)) for p in r.layers)
    return ExportSpec(
        session_id=r.session_id,
        vdisk=r.vdisk,
        version=r.version,
        layers=layers,
        size=r.size,
        write_cache=r.write_cache,
        read_only=r.read_only,
        write_cache_persistence=r.write_cache_persistence,
        mac=r.mac,
        store=r.store,
        traceparent=r.boot_traceparent,
        record_blocks=not r.replay_of,
        client_addr=r.client_addr,
        chap=chap_from_record(r.chap),
        initiator_iqn=r.initiator_iqn or None,
    )


def chap_from_record(value: ChapRecord | Mapping[str, Any] | None) -> ChapSecrets | None:
    """The ``chap`` of a resolve answer: None, or a user and secret (and both reverse ones
    or neither), all non-empty strings; anything else is a malformed answer (ValueError)."""
    if value is None:
        return None
    c = value if isinstance(value, ChapRecord) else ChapRecord.model_validate(value)
    return ChapSecrets(c.user, c.secret, c.reverse_user, c.reverse_secret)


async def listen_for_announcements(nc: NATS, node: str, sessions: SessionManager) -> Subscription:
    """Open every session announced to this node ahead of its client."""

    async def on_announcement(msg: Msg) -> None:
        try:
            token, record = parse_announcement(msg.data)
            spec = spec_from_record(record, sessions.settings.vdisk_root)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("stream: ignored a malformed session announcement (%s: %s)",
                        type(e).__name__, e)  # fmt: skip
            return
        sessions.prepare(token, spec)  # in the background: announcements never queue

    return await nc.subscribe(prepare_subject(node), cb=on_announcement)
