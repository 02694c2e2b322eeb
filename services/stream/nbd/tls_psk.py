"""TLS-PSK for NBD: pre-shared keys in the format of GnuTLS's ``psktool`` (``name:hexkey``).

Python's ``ssl`` has PSK callbacks only from 3.13 on; streamboot runs on 3.11+. The server
callback is therefore set on the context's OpenSSL ``SSL_CTX`` through ctypes, on the very
libssl that Python's ``_ssl`` is linked to, so the same :class:`ssl.SSLContext` goes on to
serve through the event loop's ``start_tls`` as the X.509 one does. Two callbacks: TLS 1.3's
external PSK (``SSL_CTX_set_psk_find_session_callback``: a session made from the key, with
the SHA-256 suite GnuTLS binds external PSKs with) and TLS 1.2's PSK suites
(``SSL_CTX_set_psk_server_callback``), which is what GnuTLS clients (libnbd ``--tls-psk``,
QEMU ``tls-creds-psk``) offer. The node's certificate stays for X.509 clients.
"""

from __future__ import annotations

import _ssl
import ctypes
import ctypes.util
import re
import ssl
import sys
from pathlib import Path

# TLS 1.2: unsigned int cb(SSL *ssl, const char *identity, unsigned char *psk,
#                         unsigned int max_psk_len)
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint
)
# TLS 1.3: int cb(SSL *ssl, const unsigned char *identity, size_t identity_len,
#                 SSL_SESSION **sess)
_FIND_SESSION = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)  # fmt: skip
# An external PSK's binder hash is SHA-256 for GnuTLS clients: TLS_AES_128_GCM_SHA256.
TLS13_AES_128_GCM_SHA256 = b"\x13\x01"
TLS1_3_VERSION = 0x0304
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
_LINE = re.compile(r"^([^:\s]{1,128}):([0-9a-fA-F]{2,1024})$")
# The callbacks must outlive their contexts: ctypes frees a callback with its last reference.
_KEEP: list[object] = []


class PskError(ValueError):
    pass


def read_keys(path: Path) -> dict[bytes, bytes]:
    """``name:hexkey`` lines (psktool's format); blank lines and ``#`` comments skipped."""
    keys: dict[bytes, bytes] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None or len(m.group(2)) % 2:
            raise PskError(f"{path}:{n}: not a 'name:hexkey' line")
        keys[m.group(1).encode()] = bytes.fromhex(m.group(2))
    if not keys:
        raise PskError(f"{path}: no keys")
    return keys


def _libssl() -> ctypes.CDLL:
    """The libssl ``_ssl`` uses: its symbols are already in the process."""
    lib = ctypes.CDLL(_ssl.__file__)
    if not hasattr(lib, "SSL_CTX_set_psk_server_callback"):
        name = ctypes.util.find_library("ssl")
        if name is None:
            raise PskError("libssl not found")
        lib = ctypes.CDLL(name)
    return lib


def _ssl_ctx(context: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The ``SSL_CTX *`` of ``context`` (CPython's PySSLContext: the pointer follows the
    object header), checked against what ``ssl`` itself reads from it."""
    header = sys.getsizeof(object())  # PyObject_HEAD: refcount and type pointer
    pointer = ctypes.c_void_p.from_address(id(context) + header).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != context.options:
        raise PskError("this Python's ssl.SSLContext does not hold its SSL_CTX where expected")
    return pointer


# GnuTLS's PSK suites for TLS 1.2 (TLS 1.3 suites are not chosen by this string) ahead of
# Python's defaults, which certificate clients keep using.
CIPHERS = (
    "ECDHE-PSK+AESGCM:ECDHE-PSK+CHACHA20:DHE-PSK+AESGCM:PSK+AESGCM:"
    "ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
)


def install(context: ssl.SSLContext, keys: dict[bytes, bytes]) -> None:
    """Let clients of ``context`` (a server context, with or without a certificate)
    authenticate by one of ``keys`` instead."""
    context.set_ciphers(CIPHERS)

    def lookup(_ssl_ptr: int, identity: bytes | None, out: object, max_len: int) -> int:
        key = keys.get(identity or b"")
        if key is None or len(key) > max_len:
            return 0  # unknown name: the handshake fails
        ctypes.memmove(out, key, len(key))
        return len(key)

    lib = _libssl()
    _declare(lib)

    def find_session(ssl_ptr: int, identity: object, length: int, out: object) -> int:
        out[0] = None  # type: ignore[index]
        key = keys.get(ctypes.string_at(identity, length))
        if key is None:
            return 1  # no such name: no PSK (the handshake then fails without a certificate)
        cipher = lib.SSL_CIPHER_find(ssl_ptr, TLS13_AES_128_GCM_SHA256)
        session = lib.SSL_SESSION_new()
        if not cipher or not session:
            return 0
        if not (
            lib.SSL_SESSION_set1_master_key(session, key, len(key))
            and lib.SSL_SESSION_set_cipher(session, cipher)
            and lib.SSL_SESSION_set_protocol_version(session, TLS1_3_VERSION)
        ):
            lib.SSL_SESSION_free(session)
            return 0
        out[0] = session  # type: ignore[index]  # OpenSSL takes the reference
        return 1

    ctx_ptr = _ssl_ctx(context, lib)
    # The suite is chosen before the PSK is looked at, and a PSK serves only a suite of its
    # hash: the node picks (server preference) SHA-256 suites first.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not lib.SSL_CTX_set_ciphersuites(ctx_ptr, TLS13_SUITES):
        raise PskError("OpenSSL refused the TLS 1.3 suites")
    callbacks = (_CALLBACK(lookup), _FIND_SESSION(find_session))
    lib.SSL_CTX_set_psk_server_callback(ctx_ptr, callbacks[0])
    lib.SSL_CTX_set_psk_find_session_callback(ctx_ptr, callbacks[1])
    _KEEP.append(callbacks)


def _declare(lib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    lib.SSL_CTX_set_psk_server_callback.argtypes = [vp, _CALLBACK]
    lib.SSL_CTX_set_psk_server_callback.restype = None
    lib.SSL_CTX_set_psk_find_session_callback.argtypes = [vp, _FIND_SESSION]
    lib.SSL_CTX_set_psk_find_session_callback.restype = None
    lib.SSL_CTX_get_options.argtypes = [vp]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_set_ciphersuites.argtypes = [vp, ctypes.c_char_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    lib.SSL_CIPHER_find.argtypes = [vp, ctypes.c_char_p]
    lib.SSL_CIPHER_find.restype = vp
    lib.SSL_SESSION_new.argtypes = []
    lib.SSL_SESSION_new.restype = vp
    lib.SSL_SESSION_free.argtypes = [vp]
    lib.SSL_SESSION_free.restype = None
    lib.SSL_SESSION_set1_master_key.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.SSL_SESSION_set1_master_key.restype = ctypes.c_int
    lib.SSL_SESSION_set_cipher.argtypes = [vp, vp]
    lib.SSL_SESSION_set_cipher.restype = ctypes.c_int
    lib.SSL_SESSION_set_protocol_version.argtypes = [vp, ctypes.c_int]
    lib.SSL_SESSION_set_protocol_version.restype = ctypes.c_int
