"""CHAP in an iSCSI login's security stage, target side (RFC 7143 12.1.3, RFC 1994, MD5).

One :class:`ChapLogin` per login: ``AuthMethod=CHAP`` chosen, then the initiator's
``CHAP_A``, our ``CHAP_I``/``CHAP_C``, its ``CHAP_N``/``CHAP_R`` (and for mutual CHAP its
``CHAP_I``/``CHAP_C``, which we answer with our ``CHAP_N``/``CHAP_R``). Every failure is a
:class:`ChapFailed` whose message names what was wrong, never a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from services.stream.spec import ChapSecrets

KEYS = ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")
MD5 = "5"
CHALLENGE_BYTES = 16
# A challenge or response larger than this is hostile (RFC 7143 allows up to 1024 bytes).
MAX_BINARY = 1024


class ChapFailed(Exception):
    """The initiator did not prove it knows the secret (or broke the exchange)."""


def decode_binary(value: str) -> bytes:
    """An iSCSI binary value: ``0x`` hex or ``0b`` base64 (RFC 7143 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            raw = binascii.unhexlify(value[2:] if len(value) % 2 == 0 else "0" + value[2:])
        elif value[:2] in ("0b", "0B"):
            raw = base64.b64decode(value[2:], validate=True)
        else:
            raise ChapFailed(f"not a binary value: {value[:20]!r}")
    except (binascii.Error, ValueError):
        raise ChapFailed(f"not a binary value: {value[:20]!r}") from None
    if not raw or len(raw) > MAX_BINARY:
        raise ChapFailed("a challenge or response of a bad length")
    return raw


def response(ident: int, secret: str, challenge: bytes) -> bytes:
    """RFC 1994: MD5 over the identifier, the secret and the challenge."""
    return hashlib.md5(bytes([ident]) + secret.encode() + challenge).digest()


class ChapLogin:
    def __init__(self, secrets: ChapSecrets) -> None:
        self.secrets = secrets
        self.state = "method"  # method -> algorithm -> response -> done
        self.ident = 0
        self.challenge = b""

    @property
    def done(self) -> bool:
        return self.state == "done"

    def chosen(self) -> None:
        """AuthMethod=CHAP was agreed."""
        self.state = "algorithm"

    def step(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Our keys for the CHAP keys of one login request (none: wait for more)."""
        if not keys:
            return []
        if self.state == "algorithm":
            if set(keys) != {"CHAP_A"}:
                raise ChapFailed(f"expected CHAP_A, got {', '.join(sorted(keys))}")
            if MD5 not in keys["CHAP_A"].split(","):
                raise ChapFailed(f"no common CHAP algorithm in {keys['CHAP_A'][:40]!r} (MD5: 5)")
            self.ident = os.urandom(1)[0]
            self.challenge = os.urandom(CHALLENGE_BYTES)
            self.state = "response"
            return [
                ("CHAP_A", MD5),
                ("CHAP_I", str(self.ident)),
                ("CHAP_C", "0x" + self.challenge.hex()),
            ]
        if self.state == "response":
            return self._check(keys)
        raise ChapFailed(f"CHAP keys out of turn ({', '.join(sorted(keys))})")

    def _check(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise ChapFailed("expected CHAP_N and CHAP_R")
        s = self.secrets
        got = decode_binary(keys["CHAP_R"])
        want = response(self.ident, s.secret, self.challenge)
        # Both compared in constant time, and both always: a wrong name or a wrong secret
        # take the same time and get the same status.
        name_ok = hmac.compare_digest(keys["CHAP_N"].encode(), s.user.encode())
        if not (hmac.compare_digest(got, want) and name_ok):
            raise ChapFailed("CHAP name or response wrong (the initiator's user or secret)")
        mutual = "CHAP_I" in keys or "CHAP_C" in keys
        if s.reverse_secret is None or s.reverse_user is None:
            if mutual:
                raise ChapFailed("the initiator asked for mutual CHAP, which is not set up")
            self.state = "done"
            return []
        if not mutual:
            raise ChapFailed("mutual CHAP is required: the initiator sent no challenge")
        try:
            ident = int(keys.get("CHAP_I", ""), 0)
        except ValueError:
            ident = -1
        if not 0 <= ident <= 255:
            raise ChapFailed("a bad CHAP_I from the initiator")
        challenge = decode_binary(keys.get("CHAP_C", ""))
        if challenge == self.challenge:
            raise ChapFailed("the initiator sent our own challenge back (reflection)")
        self.state = "done"
        answer = response(ident, s.reverse_secret, challenge)
        return [("CHAP_N", s.reverse_user), ("CHAP_R", "0x" + answer.hex())]
