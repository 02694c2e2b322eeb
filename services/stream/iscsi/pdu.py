"""iSCSI PDUs (RFC 7143 section 11): the 48-byte basic header segment, additional header
segments, the data segment padded to 4 bytes, and the optional CRC32C digests.

Parsing takes bytes from the network and checks every length against the limits the
connection negotiated before anything is allocated; building returns the bytes to send.
Only the fields streamboot reads or writes have names; the rest stay in ``bhs``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c

BHS_LEN = 48
DIGEST_LEN = 4
NO_TAG = 0xFFFFFFFF

# Initiator opcodes.
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK = 0x10
# Target opcodes.
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_REJECT = 0x3F

FLAG_IMMEDIATE = 0x40  # byte 0
FLAG_FINAL = 0x80  # byte 1
# SCSI Command byte 1.
CMD_READ = 0x40
CMD_WRITE = 0x20
# Login byte 1.
LOGIN_TRANSIT = 0x80
LOGIN_CONTINUE = 0x40
# Data-In byte 1.
DATA_ACK = 0x40
DATA_STATUS = 0x01
# Residual flags (SCSI Response byte 1, Data-In byte 1).
RESID_OVERFLOW = 0x04
RESID_UNDERFLOW = 0x02

# Reject reasons (11.17.1).
REJECT_DIGEST = 0x02
REJECT_PROTOCOL = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_INVALID_FIELD = 0x09

# The largest data segment we accept, whatever a peer declares (the 24-bit field allows 16 MiB).
MAX_DATA_SEGMENT = 1024 * 1024
# AHS of more than this is refused (the field counts 4-byte words, up to 1020 bytes).
MAX_AHS = 1020

_U32 = struct.Struct(">I")


class PduError(Exception):
    """A PDU we cannot take: the connection ends (ErrorRecoveryLevel 0)."""


class DigestError(PduError):
    """A header or data digest that does not match (``bhs``: the PDU's header; ``data``:
    the data digest, so the header itself was sound)."""

    def __init__(self, message: str, bhs: bytes, data: bool) -> None:
        super().__init__(message)
        self.bhs = bhs
        self.data = data


def crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return crc32c.crc32c(data, value)


def pad4(n: int) -> int:
    return -n & 3


@dataclass(slots=True)
class Pdu:
    bhs: bytes
    ahs: bytes = b""
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & FLAG_IMMEDIATE)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & FLAG_FINAL)

    @property
    def lun(self) -> int:
        """The LUN in the flat/peripheral addressing of SAM (first two bytes)."""
        return ((self.bhs[8] & 0x3F) << 8) | self.bhs[9]

    @property
    def lun_raw(self) -> bytes:
        return self.bhs[8:16]

    def u32(self, at: int) -> int:
        return _U32.unpack_from(self.bhs, at)[0]

    @property
    def itt(self) -> int:
        return self.u32(16)

    @property
    def ttt(self) -> int:
        return self.u32(20)

    @property
    def cmd_sn(self) -> int:
        return self.u32(24)

    @property
    def exp_stat_sn(self) -> int:
        return self.u32(28)

    @property
    def cdb(self) -> bytes:
        """A SCSI Command's CDB: 16 bytes, longer with an extended-CDB AHS (type 1)."""
        cdb = self.bhs[32:48]
        if self.ahs:
            cdb += extended_cdb(self.ahs)
        return cdb


def extended_cdb(ahs: bytes) -> bytes:
    pos = 0
    while pos + 4 <= len(ahs):
        length, kind = struct.unpack_from(">HB", ahs, pos)
        body = ahs[pos + 4 : pos + 3 + length] if length else b""
        if kind == 1:
            return body
        pos += 3 + length + pad4(3 + length)
    return b""


def parse(
    buf: bytearray, pos: int, max_data: int, header_digest: bool, data_digest: bool
) -> tuple[Pdu, int] | None:
    """The PDU at ``buf[pos:]`` and its length on the wire, None while it is incomplete;
    PduError (DigestError) for one we cannot take."""
    avail = len(buf) - pos
    if avail < BHS_LEN:
        return None
    ahs = buf[pos + 4] * 4
    dlen = int.from_bytes(buf[pos + 5 : pos + 8], "big")
    if ahs > MAX_AHS:
        raise PduError("AHS too long")
    if dlen > max_data:
        raise PduError(f"data segment of {dlen} bytes exceeds {max_data}")
    head = BHS_LEN + ahs
    hd = DIGEST_LEN if header_digest else 0
    padded = dlen + pad4(dlen)
    dd = DIGEST_LEN if data_digest and dlen else 0
    total = head + hd + padded + dd
    if avail < total:
        return None
    header = bytes(buf[pos : pos + head])
    if hd and crc(header) != int.from_bytes(buf[pos + head : pos + head + hd], "little"):
        raise DigestError("header digest mismatch", header[:BHS_LEN], False)
    at = pos + head + hd
    if dd:
        want = int.from_bytes(buf[at + padded : at + padded + dd], "little")
        if crc(memoryview(buf)[at : at + padded]) != want:
            raise DigestError("data digest mismatch", header[:BHS_LEN], True)
    data = bytes(buf[at : at + dlen]) if dlen else b""
    return Pdu(header[:BHS_LEN], header[BHS_LEN:], data), total


def build(
    bhs: bytearray,
    data: bytes | bytearray | memoryview = b"",
    header_digest: bool = False,
    data_digest: bool = False,
    length: int | None = None,
) -> list[bytes | bytearray | memoryview]:
    """The buffers of one PDU (``bhs`` gets its DataSegmentLength set here). ``length``:
    the caller sends that many data bytes itself (no padding or data digest added)."""
    n = len(data) if length is None else length
    bhs[5:8] = n.to_bytes(3, "big")
    if not (header_digest or data_digest or n & 3 or length is not None):
        return [bhs, data] if n else [bhs]  # the usual reply: no digests, whole blocks
    out: list[bytes | bytearray | memoryview] = [bhs]
    if header_digest:
        out.append(crc(bhs).to_bytes(4, "little"))
    if n and length is None:
        out.append(data)
        pad = bytes(pad4(n))
        if pad:
            out.append(pad)
        if data_digest:
            out.append(crc(pad, crc(data)).to_bytes(4, "little"))
    return out


def header(opcode: int, flags: int = FLAG_FINAL, itt: int = NO_TAG) -> bytearray:
    bhs = bytearray(BHS_LEN)
    bhs[0] = opcode
    bhs[1] = flags
    _U32.pack_into(bhs, 16, itt)
    return bhs


def put32(bhs: bytearray, at: int, value: int) -> None:
    _U32.pack_into(bhs, at, value & 0xFFFFFFFF)


# --- text keys (login, text requests) ----------------------------------------------------

MAX_KEY = 63
MAX_VALUE = 8192
# One negotiation's text, over all its continued PDUs.
MAX_TEXT = 64 * 1024


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """``key=value\\0`` pairs, in order; PduError for anything malformed."""
    if len(data) > MAX_TEXT:
        raise PduError("text too long")
    out: list[tuple[str, str]] = []
    for item in data.split(b"\0"):
        if not item:
            continue
        key, eq, value = item.partition(b"=")
        if not eq or not key or len(key) > MAX_KEY or len(value) > MAX_VALUE:
            raise PduError("malformed text key")
        try:
            out.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise PduError("text key not UTF-8") from None
    return out


def format_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
