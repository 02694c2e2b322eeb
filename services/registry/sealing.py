"""Secrets the registry must give back in clear (CHAP), sealed before they go into the log.

The event log is read by every projection, copied into backups and published on JetStream,
so a secret is appended only as AES-256-GCM ciphertext, bound to what it belongs to (the
associated data: the secret's owner and field), and opened only when the registry answers
the stream node or the boot service (docs/security.md, "iSCSI CHAP secrets").

The key: ``STREAMBOOT_SEALING_KEY`` (base64url of 32 bytes; every replica of the registry
needs the same), else the file ``STREAMBOOT_SEALING_KEY_FILE`` names (a compose secret, a
Nomad template), else ``DATA_DIR/secrets/sealing-key``, made on first use (0600).
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.private_file import replace_private
from shared.settings import SECRETS_DIR

log = logging.getLogger("streamboot.registry.sealing")

KEY_FILE = "sealing-key"
PREFIX = "v1:"


class SealingError(Exception):
    """A sealed value that this key cannot open (another key, or altered)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plain: str, context: str) -> str:
        nonce = os.urandom(12)
        return PREFIX + _b64(nonce + self._aead.encrypt(nonce, plain.encode(), context.encode()))

    def open(self, sealed: str, context: str) -> str:
        if not sealed.startswith(PREFIX):
            raise SealingError("not a sealed value")
        try:
            raw = _unb64(sealed[len(PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise SealingError(
                "a sealed secret does not open with this registry's sealing key "
                "(STREAMBOOT_SEALING_KEY or DATA_DIR/secrets/sealing-key changed?): set it again"
            ) from exc


def parse_key(text: str, where: str) -> Sealer:
    """A sealer of a base64url key; a clear error naming where a bad one came from."""
    try:
        return Sealer(_unb64(text.strip()))
    except ValueError:
        raise SealingError(
            f"{where} is not a sealing key (base64url of 32 bytes, e.g. the output of "
            "`openssl rand -base64 32 | tr '+/' '-_' | tr -d '='`)"
        ) from None


def load_sealer(data_dir: str | Path, env_key: str | None, key_file: Path | None = None) -> Sealer:
    """The registry's sealer: the key from the environment, else from ``key_file``, else
    the data dir's own file (made on first use)."""
    if env_key:
        return parse_key(env_key, "STREAMBOOT_SEALING_KEY")
    if key_file is not None:
        # Given, it must hold the key: a key made here instead would differ between
        # replicas and be lost with the container.
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise SealingError(f"STREAMBOOT_SEALING_KEY_FILE {key_file}: {exc.strerror}") from None
        return parse_key(text, f"STREAMBOOT_SEALING_KEY_FILE {key_file}")
    path = Path(data_dir) / SECRETS_DIR / KEY_FILE
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}")
        replace_private(tmp, _b64(os.urandom(32)) + "\n", durable=True)
        try:
            # A link never replaces: two registries starting at once keep one key.
            os.link(tmp, path)
            log.warning("registry: no STREAMBOOT_SEALING_KEY; generated one into %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return parse_key(path.read_text(), str(path))
