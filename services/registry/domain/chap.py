"""CHAP decisions: the credentials iSCSI logins of a device or a collection must give.

A device's own credentials win over its collection's. Names and secrets are checked here
for what every party needs: iPXE puts them on a script line (``set username ...``), libiscsi
in a URL, Windows takes secrets of 12-16 characters and RFC 7143 wants at least 96 bits.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from services.registry.domain.devices import get_device
from services.registry.domain.errors import invalid
from services.registry.projection import Projection, Record
from shared.events import Event, IscsiChapChanged
from shared.identity import check_name

_USER = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Only characters an iPXE script line keeps as they are (services/boot/ipxe_scripts.py).
_SECRET = re.compile(r"[A-Za-z0-9._+=-]{12,64}")
KINDS = ("device", "collection")

# (plain, context) -> sealed
Seal = Callable[[str, str], str]


def seal_context(kind: str, target: str, field: str) -> str:
    """What a sealed secret is bound to: it opens only as this target's this field."""
    return f"chap:{kind}:{target}:{field}"


def target_key(p: Projection, kind: str, target: str) -> str:
    if kind == "device":
        return get_device(p, target)["mac"]
    if kind == "collection":
        return check_name(target, "collection name")
    raise invalid(f"unknown CHAP target kind {kind!r}: device or collection")


def _user(value: str, what: str) -> str:
    if not _USER.fullmatch(value):
        raise invalid(f"invalid {what} {value!r}: 1-128 letters, digits, '.', '_', ':' or '-'")
    return value


def _secret(value: str, what: str) -> str:
    if not _SECRET.fullmatch(value):
        raise invalid(
            f"invalid {what}: 12-64 letters, digits or ._+=- (Windows' initiator takes 12-16)"
        )
    return value


def set_chap(
    p: Projection,
    kind: str,
    target: str,
    *,
    user: str,
    secret: str,
    reverse_user: str | None,
    reverse_secret: str | None,
    seal: Seal,
) -> list[Event]:
    key = target_key(p, kind, target)
    user, secret = _user(user or "", "CHAP user"), _secret(secret or "", "CHAP secret")
    if (reverse_user is None) != (reverse_secret is None):
        raise invalid("mutual CHAP needs both the reverse user and the reverse secret")
    sealed_reverse = None
    if reverse_user is not None and reverse_secret is not None:
        reverse_user = _user(reverse_user, "reverse CHAP user")
        if _secret(reverse_secret, "reverse CHAP secret") == secret:
            raise invalid("the reverse CHAP secret must differ from the CHAP secret (RFC 7143)")
        sealed_reverse = seal(reverse_secret, seal_context(kind, key, "reverse_secret"))
    return [
        IscsiChapChanged(
            target_kind=kind,  # type: ignore[arg-type]
            target=key,
            user=user,
            secret_sealed=seal(secret, seal_context(kind, key, "secret")),
            reverse_user=reverse_user,
            reverse_secret_sealed=sealed_reverse,
        )
    ]


def clear_chap(p: Projection, kind: str, target: str) -> list[Event]:
    key = target_key(p, kind, target)
    if (kind, key) not in p.chap:
        return []
    return [IscsiChapChanged(target_kind=kind, target=key)]  # type: ignore[arg-type]


def effective(p: Projection, mac: str) -> tuple[str, str, Record] | None:
    """The CHAP record a device's logins need (its own, else its collection's) with the
    target kind and key it was set on, or None."""
    rec = p.chap.get(("device", mac))
    if rec is not None:
        return "device", mac, rec
    collection = (p.devices.get(mac) or {}).get("collection")
    if collection and (rec := p.chap.get(("collection", collection))) is not None:
        return "collection", collection, rec
    return None


def summary(rec: Record | None) -> Record | None:
    """What a view shows of CHAP credentials: the names, never a secret."""
    if rec is None:
        return None
    return {"user": rec["user"], "mutual": rec.get("reverse_user") is not None,
            "reverse_user": rec.get("reverse_user")}  # fmt: skip
