"""The stream service's NATS contract: sessions announced to a stream node before their
client connects.

When the registry opens a boot session it tells the stream node it placed the session on
(``streamboot.stream.<node>.session.prepare``, body = the :class:`SessionRecord` that
``session.resolve`` answers for the token, plus the token). The node opens the session at
once, so the client's first connection finds it ready.

A core NATS publish, not a request: an announcement that is lost, malformed or fails to open
costs only the time it would have saved (the client's first connection opens the session
itself).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS

from shared.bus import subject_token
from shared.contracts.registry import SessionRecord

PREFIX = "streamboot.stream"
# Subject template for the docs and the permissions: ``<node>`` is one escaped token.
PREPARE = f"{PREFIX}.<node>.session.prepare"
SUBJECTS = (PREPARE,)


def prepare_subject(node: str) -> str:
    """The subject only the stream node ``node`` listens on for announced sessions."""
    return f"{PREFIX}.{subject_token(node)}.session.prepare"


async def announce_session(
    nc: NATS, node: str, token: str, record: SessionRecord | Mapping[str, Any]
) -> None:
    """Tell stream node ``node`` to open the session ``token`` now (``record``: its
    ``session.resolve`` answer)."""
    body = record.model_dump() if isinstance(record, SessionRecord) else dict(record)
    await nc.publish(prepare_subject(node), json.dumps({**body, "token": token}).encode())


def parse_announcement(data: bytes) -> tuple[str, SessionRecord]:
    """``(token, record)`` of an announcement; ``ValueError`` (pydantic's included) or
    ``TypeError`` on anything else."""
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("an announcement is a JSON object")
    token = body.pop("token", None)
    if not isinstance(token, str) or not token:
        raise ValueError("no session token")
    return token, SessionRecord.model_validate(body)
