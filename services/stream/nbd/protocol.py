"""NBD wire format (fixed newstyle handshake, simple and structured replies): the parser.

Everything that reads or builds NBD bytes lives here, with no I/O: the parsing of
option payloads (hostile input: a :class:`BadOption` for anything malformed) and the
building of option and transmission replies. ``server.py`` keeps the connection: the
handshake's dispatch and the transmission loop. Names follow the NBD protocol document
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from shared.nbd_wire import (
    CLIENT_FLAGS,
    CLIENT_FLAGS_KNOWN,
    EXPORT_NAME_REPLY,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_S,
    INFO_EXPORT,
    INFO_EXPORT_S,
    MAX_BLOCK,
    META_BASE_ALLOCATION,
    META_CONTEXT_ID,
    MIN_BLOCK,
    NBDMAGIC,
    OPT_LIST_META_CONTEXT,
    OPTION_REPLY,
    PREFERRED_BLOCK,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    REPLY_FLAG_DONE,
    REPLY_MAGIC_OPT,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_DF,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)

if TYPE_CHECKING:
    from services.stream.path.backend import Backend


# Structured READ reply: chunk header + 8-byte offset, then the data.
STRUCTURED_READ = struct.Struct(">IHHQIQ")
SERVER_GREETING = GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
INFO_BLOCK_SIZE_REPLY = INFO_BLOCK_SIZE_S.pack(
    INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK
)


class BadOption(ValueError):
    """An option payload that does not parse: answered NBD_REP_ERR_INVALID."""


def parse_client_flags(data: bytes) -> bool | None:
    """The client's flags after the greeting: whether it wants no zeroes after
    NBD_OPT_EXPORT_NAME's reply; None for flags this server does not accept."""
    (cflags,) = CLIENT_FLAGS.unpack(data)
    if cflags & ~CLIENT_FLAGS_KNOWN or not cflags & FLAG_FIXED_NEWSTYLE:
        return None
    return bool(cflags & FLAG_NO_ZEROES)


def parse_info_request(data: bytes) -> bytes:
    """The export name of an NBD_OPT_INFO / NBD_OPT_GO payload (the requested info items
    are checked for length, not used: the server sends the same items to everyone)."""
    try:
        (nlen,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
    except struct.error as e:
        raise BadOption(str(e)) from None
    if len(data) != 4 + nlen + 2 + 2 * nreq or len(name) != nlen:
        raise BadOption("lengths do not add up")
    return name


def parse_meta_context(data: bytes) -> list[bytes]:
    """The queries of an NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload."""
    try:
        (nlen,) = struct.unpack_from(">I", data)
        pos = 4 + nlen
        (nq,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(nq):
            (qlen,) = struct.unpack_from(">I", data, pos)
            queries.append(data[pos + 4 : pos + 4 + qlen])
            pos += 4 + qlen
    except struct.error as e:
        raise BadOption(str(e)) from None
    if pos != len(data):
        raise BadOption("lengths do not add up")
    return queries


def wants_base_allocation(opt: int, queries: list[bytes]) -> bool:
    """Whether a meta context option asks for (or, listing everything, includes)
    ``base:allocation``, the only context this server has."""
    if opt == OPT_LIST_META_CONTEXT and not queries:
        return True
    return any(q in (META_BASE_ALLOCATION, b"base:") for q in queries)


def meta_context_replies(opt: int, want: bool) -> bytes:
    """The answer to a meta context option: the context when wanted, then the ACK."""
    out = b""
    if want:
        context = struct.pack(">I", META_CONTEXT_ID) + META_BASE_ALLOCATION
        out = option_reply(opt, REP_META_CONTEXT, context)
    return out + option_reply(opt, REP_ACK)


def transmission_flags(b: Backend) -> int:
    """The export's flags, from the backend's ``can_*`` table."""
    flags = TF_HAS_FLAGS | TF_SEND_DF
    if not b.can_write():
        flags |= TF_READ_ONLY
    if b.can_flush():
        flags |= TF_SEND_FLUSH
    if b.can_fua():
        flags |= TF_SEND_FUA
    if b.can_trim():
        flags |= TF_SEND_TRIM
    if b.can_zero():
        flags |= TF_SEND_WRITE_ZEROES
    if b.can_multi_conn():
        flags |= TF_CAN_MULTI_CONN
    return flags


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(124)


def info_replies(opt: int, size: int, flags: int) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO's answer: the export and block size infos, then the ACK
    (one send: the client reads on only after the ACK)."""
    return (
        option_reply(opt, REP_INFO, INFO_EXPORT_S.pack(INFO_EXPORT, size, flags))
        + option_reply(opt, REP_INFO, INFO_BLOCK_SIZE_REPLY)
        + option_reply(opt, REP_ACK)
    )


def simple_reply(error: int, handle: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def read_reply_header(structured: bool, handle: int, offset: int, length: int) -> bytes:
    """The header of a successful READ's reply; ``length`` bytes of data follow it."""
    if structured:
        return STRUCTURED_READ.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle,
            8 + length, offset,
        )  # fmt: skip
    return simple_reply(0, handle)


def block_status_reply(handle: int, extents: Iterable[tuple[int, int]], req_one: bool) -> bytes:
    """NBD_CMD_BLOCK_STATUS's answer for base:allocation: runs of equal flags merged
    (only the first with NBD_CMD_FLAG_REQ_ONE)."""
    merged: list[list[int]] = []
    for n, f in extents:
        if merged and merged[-1][1] == f:
            merged[-1][0] += n
        else:
            merged.append([n, f])
    if req_one:
        merged = merged[:1]
    payload = struct.pack(">I", META_CONTEXT_ID) + b"".join(
        struct.pack(">II", n, f) for n, f in merged
    )
    return structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, payload)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC_OPT, option, reply, len(data)) + data


def structured_chunk(flags: int, type_: int, handle: int, payload: bytes) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type_, handle, len(payload)) + (
        payload
    )


def structured_error(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, payload)
