"""iSCSI target (RFC 7143, ErrorRecoveryLevel 0, one connection per session) on the session's
read/write path, beside NBD and HTTP.

The target name carries the session token as the NBD export name does:
``iqn.2026-12.io.streamboot:<token>``; logging in to it opens (or joins) that session
through the same :class:`SessionManager`, with the same address binding and events. A
discovery session's ``SendTargets=All`` lists nothing (tokens are secrets); naming a
target in ``SendTargets=<iqn>`` returns it with this portal.

Per connection: the login phase is a coroutine; in full feature phase each PDU is read by
the same coroutine and dispatched. A READ whose blocks are in the page cache is answered
inline (Data-In with the status collapsed into the last PDU); other commands run as
tasks, so responses may overtake each other (SIMPLE task attributes allow it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from services.stream.conn import Connection
from services.stream.iscsi import chap as C
from services.stream.iscsi import pdu as P
from services.stream.iscsi import scsi as S
from services.stream.path.backend import (
    ZERO_FD,
    BlocksMissing,
    Piece,
    all_cached,
    read_into,
    read_into_nowait,
)
from services.stream.sessions import Session, SessionManager
from shared import metrics
from shared.address_cap import peer_host
from shared.events import IscsiLoginRefused
from shared.iscsi_names import TARGET_PREFIX

log = logging.getLogger(__name__)

# What we accept in one data segment, declared at login (MaxRecvDataSegmentLength).
MAX_RECV_DATA = 256 * 1024
MAX_BURST = 1024 * 1024
FIRST_BURST = 256 * 1024
# Commands the initiator may have queued (the CmdSN window): bounds tasks and write buffers.
CMD_WINDOW = 64
# Immediate commands do not count against the window: beyond this many we stop reading.
MAX_INFLIGHT = 2 * CMD_WINDOW
# A Data-Out buffer (WRITE, UNMAP, WRITE SAME...) larger than this is refused.
MAX_DATA_OUT = S.MAX_TRANSFER_BLOCKS * S.BLOCK
LOGIN_MAX_DATA = 64 * 1024
LATENCY = {
    op: metrics.request_histogram("stream", f"iscsi:{op}") for op in ("read", "write", "other")
}

# Login status (class << 8 | detail), RFC 7143 11.13.5.
LOGIN_OK = 0x0000
LOGIN_AUTH_FAILED = 0x0201
LOGIN_FORBIDDEN = 0x0202
LOGIN_NOT_FOUND = 0x0203
LOGIN_MISSING_PARAM = 0x0207
LOGIN_NO_SESSION = 0x020A
LOGIN_INVALID = 0x020B
LOGIN_UNSUPPORTED_VERSION = 0x0205
LOGIN_TARGET_ERROR = 0x0300

STAGE_SECURITY, STAGE_OPERATIONAL, STAGE_FULL = 0, 1, 3

# Data-In header: opcode, flags, -, status, AHS length, DataSegmentLength (set by
# P.build), LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN, DataSN, buffer offset, residual.
DATA_IN = struct.Struct(">BBxBB3x8sIIIIIIII")
# Reads at least this large go out by sendfile when the transport can (RawTransport).
SENDFILE_MIN = 64 * 1024
ZEROS = memoryview(bytes(MAX_RECV_DATA))

_tsih = itertools.cycle(range(1, 0x10000))
# The ISID iPXE's initiator logs in with: IANA enterprise-number form (0x40), Fen Systems'
# number 10019, then a random qualifier. Its logins are a boot firmware's (SessionAttached).
IPXE_ISID = bytes.fromhex("40002723")


class LoginFailed(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class LoginRefused(LoginFailed):
    """A login to a known session refused for who the initiator is (CHAP, initiator
    name): recorded as IscsiLoginRefused."""


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32 bits."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def _number(value: str, lo: int, hi: int) -> int | None:
    try:
        n = int(value, 0) if value[:2].lower() == "0x" else int(value)
    except ValueError:
        return None
    return n if lo <= n <= hi else None


@dataclass
class DataOutTask:
    """A command waiting for its Data-Out bytes (immediate, unsolicited, then by R2T)."""

    itt: int
    lun: bytes
    cdb: bytes
    edtl: int
    rw: S.Rw | None
    error: S.CheckCondition | None
    t0: float
    buf: bytearray = field(default_factory=bytearray)
    received: int = 0
    # Unsolicited data may come up to here; an R2T then asks for the rest.
    unsolicited_end: int = 0
    ttt: int = P.NO_TAG
    r2t_end: int = 0
    r2t_sn: int = 0
    # The DataSN the next Data-Out must carry (counted per R2T burst, and for unsolicited).
    data_sn: int = 0
    # The data is read off the wire and dropped.
    ignore: bool = False


class IscsiConnection(Connection):
    protocol_name = "iscsi"

    def __init__(self, mgr: SessionManager) -> None:
        super().__init__(mgr)
        self.portal = ""
        self.header_digest = False
        self.data_digest = False
        # Negotiated during login, in force after its last response.
        self._want_digest = {"HeaderDigest": False, "DataDigest": False}
        # Negotiated values (defaults of RFC 7143 13).
        self.max_send_data = 8192
        self.max_burst = 262144
        self.first_burst = 65536
        self.immediate_data = True
        self.initial_r2t = True
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self.discovery = False
        self.initiator = ""
        # The initiator's session identifier (ISID, 6 bytes of the leading login).
        self.isid = b""
        self.target = ""
        self.lun: S.Lun | None = None
        self._pending: Session | None = None
        self._chap: C.ChapLogin | None = None
        self._writes: dict[int, DataOutTask] = {}
        self._running: set[int] = set()
        self._aborted: set[int] = set()
        self._ttt = itertools.cycle(range(1, 0xFFFFFFFF))
        self._full_feature = False
        self._reading_paused = False
        self._logout = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # SendTargets names the address the initiator reached us on.
        host, port = transport.get_extra_info("sockname")[:2]
        self.portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- sending -------------------------------------------------------------------------

    def _send(self, bhs: bytearray, data: bytes | bytearray | memoryview = b"") -> None:
        write = self.write
        for buf in P.build(bhs, data, self.header_digest, self.data_digest):
            write(buf)

    def _max_cmd_sn(self) -> int:
        room = max(1, CMD_WINDOW - len(self._running) - len(self._writes))
        return (self.exp_cmd_sn + room - 1) & 0xFFFFFFFF

    def _status_fields(self, bhs: bytearray, advance: bool = True) -> None:
        """StatSN, ExpCmdSN, MaxCmdSN at 24/28/32 (StatSN consumed unless ``advance`` is off)."""
        P.put32(bhs, 24, self.stat_sn)
        if advance:
            self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
        P.put32(bhs, 28, self.exp_cmd_sn)
        P.put32(bhs, 32, self._max_cmd_sn())

    def _reject(self, reason: int, rejected: bytes) -> None:
        bhs = P.header(P.OP_REJECT)
        bhs[2] = reason
        self._status_fields(bhs)
        self._send(bhs, rejected[: P.BHS_LEN])

    # --- reading -------------------------------------------------------------------------

    async def _read_pdu(self, max_data: int) -> P.Pdu:
        """The next PDU, waiting for it (the login phase)."""
        while (got := P.parse(self.buf, 0, max_data, False, False)) is None:
            await self._fill(len(self.buf) + 1)
        del self.buf[: got[1]]
        return got[0]

    async def run(self) -> None:
        """The login; then the PDUs are handled as they arrive (data_received)."""
        try:
            await self._login()
        except LoginFailed as e:
            log.info("iscsi login from %s (%s) refused: %s", self.peer, self.initiator, e)
            self.close("login-refused")
            return
        except P.PduError as e:
            log.info("iscsi initiator %s: %s", self.peer, e)
            self.close("protocol-error")
            return
        self._full_feature = True
        if self.buf:
            self._process()

    def on_data(self) -> None:
        if self._full_feature and not self._reading_paused:
            self._process()

    def _process(self) -> None:
        """Handle every complete PDU in the buffer; their replies go out in one batch."""
        buf = self.buf
        pos = 0
        self.begin_batch()
        try:
            while not self.closed and not self._logout:
                got = P.parse(buf, pos, MAX_RECV_DATA, self.header_digest, self.data_digest)
                if got is None:
                    break
                pos += got[1]
                self._dispatch(got[0])
                if self.inflight >= MAX_INFLIGHT:
                    self._reading_paused = True
                    self.transport.pause_reading()
                    break
        except P.PduError as e:
            log.info("iscsi initiator %s: %s", self.peer, e)
            if isinstance(e, P.DigestError) and e.data:
                self._reject(P.REJECT_DIGEST, e.bhs)
            self.end_batch()
            self.close("protocol-error")
        finally:
            if pos:
                del buf[:pos]
            self.end_batch()

    # --- login -----------------------------------------------------------------------------

    async def _login(self) -> None:
        first = True
        text = b""
        offered_mrdsl = False
        while True:
            req = await self._read_pdu(LOGIN_MAX_DATA)
            if req.opcode != P.OP_LOGIN_REQ:
                raise P.PduError("a PDU other than Login before the login finished")
            flags = req.flags
            transit = bool(flags & P.LOGIN_TRANSIT)
            csg, nsg = (flags >> 2) & 3, flags & 3
            if first:
                self.exp_cmd_sn = req.cmd_sn
                self.stat_sn = req.exp_stat_sn
                self.isid = bytes(req.bhs[8:14])
            text += req.data
            if len(text) > P.MAX_TEXT:
                raise P.PduError("login text too long")
            if flags & P.LOGIN_CONTINUE:
                self._login_response(req, csg, csg, False, [])
                continue
            try:
                if req.bhs[3] > 0:  # Version-min
                    raise LoginFailed(LOGIN_UNSUPPORTED_VERSION, "unsupported version")
                if (transit and flags & P.LOGIN_CONTINUE) or csg == 2 or (transit and nsg <= csg):
                    raise LoginFailed(LOGIN_INVALID, "invalid stage transition")
                if int.from_bytes(req.bhs[14:16], "big"):
                    raise LoginFailed(LOGIN_NO_SESSION, "no session to add a connection to")
                keys = P.parse_text(text)
                text = b""
                if first:
                    await self._first_login(dict(keys))
                reply = self._negotiate([kv for kv in keys if kv[0] not in C.KEYS], csg)
                reply += self._authenticate(keys, csg)
                if transit and csg == STAGE_SECURITY and self._chap and not self._chap.done:
                    transit = False  # the exchange goes on: stay in the security stage
                if csg == STAGE_OPERATIONAL and not offered_mrdsl and not self.discovery:
                    reply.append(("MaxRecvDataSegmentLength", str(MAX_RECV_DATA)))
                    offered_mrdsl = True
                if first and not self.discovery:
                    reply.append(("TargetPortalGroupTag", "1"))
            except LoginFailed as e:
                if isinstance(e, LoginRefused):
                    self._login_refused(e)
                self._login_response(req, csg, csg, False, [], e.status)
                self.end_batch()
                raise
            except P.PduError as e:
                self._login_response(req, csg, csg, False, [], LOGIN_INVALID)
                raise LoginFailed(LOGIN_INVALID, str(e)) from None
            first = False
            self._login_response(req, csg, nsg if transit else csg, transit, reply)
            if transit and nsg == STAGE_FULL:
                self._enter_full_feature()
                return

    def _login_response(
        self,
        req: P.Pdu,
        csg: int,
        nsg: int,
        transit: bool,
        keys: list[tuple[str, str]],
        status: int = LOGIN_OK,
    ) -> None:
        bhs = P.header(P.OP_LOGIN_RSP, (P.LOGIN_TRANSIT if transit else 0) | csg << 2 | nsg,
                       req.itt)  # fmt: skip
        bhs[8:14] = req.bhs[8:14]  # ISID
        if transit and nsg == STAGE_FULL:
            bhs[14:16] = next(_tsih).to_bytes(2, "big")
        self._status_fields(bhs)
        bhs[36], bhs[37] = status >> 8, status & 0xFF
        # Login PDUs carry no digests: those negotiated apply after the last login response.
        for buf in P.build(bhs, P.format_text(keys)):
            self.write(buf)

    async def _first_login(self, keys: dict[str, str]) -> None:
        self.initiator = keys.get("InitiatorName", "")
        if not self.initiator:
            raise LoginFailed(LOGIN_MISSING_PARAM, "no InitiatorName")
        kind = keys.get("SessionType", "Normal")
        if kind == "Discovery":
            self.discovery = True
            return
        if kind != "Normal":
            raise LoginFailed(LOGIN_INVALID, f"session type {kind!r}")
        self.target = keys.get("TargetName", "")
        if not self.target:
            raise LoginFailed(LOGIN_MISSING_PARAM, "no TargetName")
        if not self.target.startswith(TARGET_PREFIX):
            raise LoginFailed(LOGIN_NOT_FOUND, "not a streamboot target name")
        token = self.target[len(TARGET_PREFIX) :]
        session = await self.mgr.acquire(token)
        if session is None:
            raise LoginFailed(LOGIN_NOT_FOUND, self.mgr.refusals.get(token, "unknown target"))
        if self.closed:
            self.mgr.release(session)
            raise ConnectionResetError("closed during login")
        self._pending = session
        session.conns.add(self)  # closing the session (registry) ends this login too
        if not self.mgr.admits(session, "iscsi", self.peer):
            raise LoginFailed(LOGIN_FORBIDDEN, "this session belongs to another address")
        spec = session.spec
        if spec.initiator_iqn and self.initiator != spec.initiator_iqn:
            raise LoginRefused(
                LOGIN_FORBIDDEN, f"initiator {self.initiator[:224]!r} is not the session's device"
            )
        if spec.chap is not None:
            self._chap = C.ChapLogin(spec.chap)

    def _authenticate(self, keys: list[tuple[str, str]], stage: int) -> list[tuple[str, str]]:
        """The CHAP keys of one login request, answered; a session with CHAP set admits no
        login that leaves the security stage before proving its secret."""
        chap = self._chap
        offered = {k: v for k, v in keys if k in C.KEYS}
        if chap is None:
            if offered:
                raise LoginFailed(LOGIN_AUTH_FAILED, "CHAP keys without AuthMethod=CHAP")
            return []
        if stage != STAGE_SECURITY and not chap.done:
            raise LoginRefused(LOGIN_AUTH_FAILED, "CHAP required: the login skipped it")
        try:
            return chap.step(offered)
        except C.ChapFailed as e:
            raise LoginRefused(LOGIN_AUTH_FAILED, str(e)) from None

    def _login_refused(self, e: LoginFailed) -> None:
        session = self._pending
        ip = peer_host(self.peer)
        log.warning("iscsi: login from %s (%s) refused: %s", ip, self.initiator[:224], e)
        if session is None:
            return
        self.mgr.events.emit(
            IscsiLoginRefused(
                session_id=session.session_id,
                stream_node=self.mgr.settings.node_id,
                client_addr=ip,
                initiator=self.initiator[:224],
                status=e.status,
                reason=str(e),
            ),
            session.session_id,
        )

    def _negotiate(self, keys: list[tuple[str, str]], stage: int) -> list[tuple[str, str]]:
        reply: list[tuple[str, str]] = []
        for key, value in keys:
            answer = self._answer(key, value, stage)
            if answer is not None:
                reply.append((key, answer))
        self.first_burst = min(self.first_burst, self.max_burst)
        return reply

    def _answer(self, key: str, value: str, stage: int) -> str | None:
        """Our answer to one offered key; None for declarations that take none."""
        if key in ("InitiatorName", "InitiatorAlias", "SessionType", "TargetName"):
            return None
        if key == "AuthMethod":
            if stage != STAGE_SECURITY:
                return "Reject"
            want = "None" if self._chap is None else "CHAP"
            if want not in value.split(","):
                why = f"no common AuthMethod in {value[:80]!r} (this session's: {want})"
                raise (LoginRefused if self._chap else LoginFailed)(LOGIN_AUTH_FAILED, why)
            if self._chap is not None:
                self._chap.chosen()
            return want
        if key in ("HeaderDigest", "DataDigest"):
            pick = next((v for v in value.split(",") if v in ("CRC32C", "None")), None)
            if pick is None:
                return "Reject"
            self._want_digest[key] = pick == "CRC32C"
            return pick
        if key == "MaxRecvDataSegmentLength":
            n = _number(value, 512, (1 << 24) - 1)
            if n is None:
                return "Reject"
            self.max_send_data = n
            return None
        if key in ("MaxBurstLength", "FirstBurstLength"):
            n = _number(value, 512, (1 << 24) - 1)
            if n is None:
                return "Reject"
            if key == "MaxBurstLength":
                self.max_burst = n = min(n, MAX_BURST)
            else:
                self.first_burst = n = min(n, FIRST_BURST)
            return str(n)
        if key in ("ImmediateData", "InitialR2T", "DataPDUInOrder", "DataSequenceInOrder"):
            if value not in ("Yes", "No"):
                return "Reject"
            if key == "ImmediateData":
                self.immediate_data = value == "Yes"  # AND with our Yes
                return value
            if key == "InitialR2T":
                self.initial_r2t = value == "Yes"  # OR with our No
                return value
            return "Yes"  # OR with our Yes: in order
        if key in ("MaxOutstandingR2T", "MaxConnections"):
            return "1" if _number(value, 1, 65535) is not None else "Reject"
        if key == "ErrorRecoveryLevel":
            return "0" if _number(value, 0, 2) is not None else "Reject"
        if key in ("DefaultTime2Wait", "DefaultTime2Retain"):
            n = _number(value, 0, 3600)
            if n is None:
                return "Reject"
            return str(max(n, 2) if key == "DefaultTime2Wait" else min(n, 20))
        if key in ("IFMarker", "OFMarker"):
            return "No"
        if key in ("IFMarkInt", "OFMarkInt"):
            return "Irrelevant"
        return "NotUnderstood"

    def _enter_full_feature(self) -> None:
        self.header_digest = self._want_digest["HeaderDigest"]
        self.data_digest = self._want_digest["DataDigest"]
        session, self._pending = self._pending, None
        if session is None:
            return  # a discovery session
        self.session = session
        self.lun = S.Lun(session.backend, session.spec.vdisk)
        self._reinstate(session)
        self.mgr.attached(session, "iscsi", self.peer, boot_firmware=self.isid[:4] == IPXE_ISID)

    def _reinstate(self, session: Session) -> None:
        """Session reinstatement (RFC 7143 6.3.5): a login with the InitiatorName and ISID
        of a connection still open here comes from an initiator that lost that one (a
        reboot, a network blip, ErrorRecoveryLevel 0 recovery) and will never send on it
        again. The old connection ends now, its tasks with it, instead of lingering until
        keepalive finds it dead, so none of its commands runs after the new login's. Only
        after authentication: an unproven login ends nothing."""
        for conn in list(session.conns):
            if (
                conn is not self
                and isinstance(conn, IscsiConnection)
                and conn.initiator == self.initiator
                and conn.isid == self.isid
            ):
                log.info(
                    "iscsi: %s (%s) logged in again with ISID %s: its connection from %s ends",
                    self.peer, self.initiator[:224], self.isid.hex(), conn.peer,
                )  # fmt: skip
                conn.abort("session-reinstated")

    def connection_lost(self, exc: Exception | None) -> None:
        session, self._pending = self._pending, None
        if session is not None:  # a login that never finished: no attach to detach
            session.conns.discard(self)
            self.mgr.release(session)
        super().connection_lost(exc)

    # --- full feature phase ----------------------------------------------------------------

    def _dispatch(self, req: P.Pdu) -> None:
        op = req.opcode
        if op in (P.OP_SCSI_CMD, P.OP_NOP_OUT, P.OP_TMF_REQ, P.OP_TEXT_REQ, P.OP_LOGOUT_REQ):
            if not self._take_cmd_sn(req):
                return
        if op == P.OP_SCSI_CMD:
            if self.lun is None:
                return self._reject(P.REJECT_PROTOCOL, req.bhs)
            self._scsi_command(req)
        elif op == P.OP_DATA_OUT:
            self._data_out(req)
        elif op == P.OP_NOP_OUT:
            self._nop(req)
        elif op == P.OP_TEXT_REQ:
            self._text(req)
        elif op == P.OP_TMF_REQ:
            self._task_management(req)
        elif op == P.OP_LOGOUT_REQ:
            self._logout_request(req)
        elif op == P.OP_LOGIN_REQ:
            self._reject(P.REJECT_PROTOCOL, req.bhs)
        else:
            self._reject(P.REJECT_NOT_SUPPORTED, req.bhs)

    def _take_cmd_sn(self, req: P.Pdu) -> bool:
        """Check a command's CmdSN against the window; False (logged) when it is dropped."""
        if req.bhs[0] & P.FLAG_IMMEDIATE:
            return True
        sn = req.cmd_sn
        if sn != self.exp_cmd_sn:
            # On one connection commands arrive in order: anything else is a duplicate or
            # outside the window, which RFC 7143 says to drop silently.
            log.info("iscsi %s: CmdSN %d dropped (expected %d)", self.peer, sn, self.exp_cmd_sn)
            return False
        if req.opcode != P.OP_NOP_OUT or req.itt != P.NO_TAG:
            self.exp_cmd_sn = (sn + 1) & 0xFFFFFFFF
        return True

    def _nop(self, req: P.Pdu) -> None:
        if req.itt == P.NO_TAG:
            return  # an answer to a NOP-In of ours (we send none) or a bare ping
        bhs = P.header(P.OP_NOP_IN, P.FLAG_FINAL, req.itt)
        bhs[8:16] = req.lun_raw
        P.put32(bhs, 20, P.NO_TAG)
        self._status_fields(bhs)
        self._send(bhs, req.data[: self.max_send_data])

    def _text(self, req: P.Pdu) -> None:
        if req.flags & 0x40:  # continued text: our few keys never need it
            return self._reject(P.REJECT_NOT_SUPPORTED, req.bhs)
        try:
            keys = P.parse_text(req.data)
        except P.PduError:
            return self._reject(P.REJECT_INVALID_FIELD, req.bhs)
        reply: list[tuple[str, str]] = []
        for key, value in keys:
            if key == "SendTargets":
                reply += self._send_targets(value)
            else:
                reply.append((key, "NotUnderstood"))
        bhs = P.header(P.OP_TEXT_RSP, P.FLAG_FINAL, req.itt)
        P.put32(bhs, 20, P.NO_TAG)
        self._status_fields(bhs)
        self._send(bhs, P.format_text(reply)[: self.max_send_data])

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        # Target names are session tokens (secrets): only a name the initiator already
        # knows is confirmed, never listed. An unknown one is answered the same way.
        if value in ("All", "") or not value.startswith(TARGET_PREFIX):
            if value == "" and self.target:
                return [("TargetName", self.target), ("TargetAddress", f"{self.portal},1")]
            return []
        return [("TargetName", value), ("TargetAddress", f"{self.portal},1")]

    def _logout_request(self, req: P.Pdu) -> None:
        reason = req.flags & 0x7F
        bhs = P.header(P.OP_LOGOUT_RSP, P.FLAG_FINAL, req.itt)
        bhs[2] = 0 if reason in (0, 1) else 2  # 2: connection recovery not supported
        self._status_fields(bhs)
        self._send(bhs)
        self._logout = True
        self.end_batch()
        self.close("logout")

    def _task_management(self, req: P.Pdu) -> None:
        function = req.flags & 0x7F
        response = 0  # function complete
        if function == 1:  # ABORT TASK
            ref = req.u32(20)
            if self._writes.pop(ref, None) is not None:
                pass
            elif ref in self._running:
                self._aborted.add(ref)  # its response is not sent
            else:
                response = 1  # task does not exist: answered already (or never was)
        elif function in (2, 3, 5, 6, 7):  # ABORT/CLEAR TASK SET, LUN RESET, TARGET RESETS
            if function in (2, 3, 5) and req.lun != 0:
                response = 2  # LUN does not exist
            else:
                self._writes.clear()
                self._aborted |= self._running
        else:
            response = 5  # not supported
        bhs = P.header(P.OP_TMF_RSP, P.FLAG_FINAL, req.itt)
        bhs[2] = response
        self._status_fields(bhs)
        self._send(bhs)

    # --- SCSI commands -----------------------------------------------------------------------

    def _scsi_command(self, req: P.Pdu) -> None:
        lun = self.lun
        assert lun is not None
        cdb = req.cdb
        edtl = req.u32(20)
        t0 = perf_counter()
        if req.data and not self.immediate_data:
            return self._reject(P.REJECT_PROTOCOL, req.bhs)
        if len(req.data) > edtl:
            return self._reject(P.REJECT_PROTOCOL, req.bhs)
        error: S.CheckCondition | None = None
        rw: S.Rw | None = None
        try:
            if req.lun != 0 and cdb[0] not in (0x12, 0xA0, 0x03):
                raise S.lun_not_supported()
            rw = S.decode_rw(cdb)
            if rw is not None:
                lun.check_rw(rw, edtl)
        except S.CheckCondition as e:
            error = e
        if (
            rw is not None
            and rw.write
            and error is None
            and req.flags & P.CMD_WRITE
            and req.final
            and len(req.data) == edtl
            and req.itt not in self._writes
        ):  # all its data came with it (immediate): no Data-Out to wait for
            return self._write_command(req.itt, req.lun_raw, rw, edtl, req.data, t0)
        if req.flags & P.CMD_WRITE and edtl:
            if len(self._writes) >= CMD_WINDOW or req.itt in self._writes:
                return self._reject(P.REJECT_PROTOCOL, req.bhs)
            if edtl > MAX_DATA_OUT and error is None:
                error = S.invalid_field()
            task = DataOutTask(req.itt, req.lun_raw, cdb, edtl, rw, error, t0)
            # A READ sent with data (the Write flag): the data is taken and dropped, the
            # READ answers GOOD with nothing to return (no Read flag), as tgt does.
            task.ignore = rw is not None and not rw.write
            self._data_arrived(task, 0, req.data)
            task.unsolicited_end = task.received
            if not self.initial_r2t and not req.final:
                task.unsolicited_end = min(edtl, self.first_burst)
            self._writes[req.itt] = task
            self._advance_write(task)
            return
        if error is not None:
            return self._respond(req.itt, error=error)
        if rw is not None and not rw.write:
            return self._read(req.itt, req.lun_raw, rw, edtl, t0)
        if rw is not None:  # a WRITE without Data-Out: nothing to write
            return self._write_command(req.itt, req.lun_raw, rw, edtl, b"", t0)
        if req.lun != 0 and cdb[0] == 0x12:
            return self._respond_data(req.itt, req.lun_raw, edtl, S.inquiry_no_lun(cdb))
        self._start(req.itt, req.lun_raw, edtl, self._command(cdb, b"", t0))

    def _data_arrived(self, task: DataOutTask, offset: int, data: bytes) -> None:
        if offset != task.received:
            raise P.PduError(f"Data-Out at {offset}, expected {task.received}")
        if offset + len(data) > task.edtl:
            raise P.PduError("Data-Out beyond the expected data transfer length")
        if task.error is None and not task.ignore:
            task.buf += data
        task.received += len(data)

    def _data_out(self, req: P.Pdu) -> None:
        task = self._writes.get(req.itt)
        if task is None:
            return  # its task was aborted, or never was: ERL 0 drops it
        offset = req.u32(40)
        ttt = req.ttt
        if ttt == P.NO_TAG:
            if offset + len(req.data) > task.unsolicited_end:
                raise P.PduError("unsolicited Data-Out beyond FirstBurstLength")
        elif ttt != task.ttt or offset + len(req.data) > task.r2t_end:
            raise P.PduError("Data-Out outside its R2T")
        if req.u32(36) != task.data_sn:
            raise P.PduError(f"Data-Out DataSN {req.u32(36)}, expected {task.data_sn}")
        task.data_sn += 1
        self._data_arrived(task, offset, req.data)
        if ttt == P.NO_TAG:
            if req.final:
                task.unsolicited_end = task.received
                self._advance_write(task)
        elif task.received == task.r2t_end:
            task.ttt = P.NO_TAG
            self._advance_write(task)

    def _advance_write(self, task: DataOutTask) -> None:
        """Run the command when all its data is in; else ask for the next burst (one R2T
        outstanding at a time, MaxOutstandingR2T=1)."""
        if task.received < task.unsolicited_end or task.ttt != P.NO_TAG:
            return  # unsolicited data or an R2T's burst still coming
        if task.received < task.edtl:
            task.ttt = next(self._ttt)
            task.data_sn = 0
            task.r2t_end = min(task.edtl, task.received + self.max_burst)
            bhs = P.header(P.OP_R2T, P.FLAG_FINAL, task.itt)
            bhs[8:16] = task.lun
            P.put32(bhs, 20, task.ttt)
            self._status_fields(bhs, advance=False)
            P.put32(bhs, 36, task.r2t_sn)
            P.put32(bhs, 40, task.received)
            P.put32(bhs, 44, task.r2t_end - task.received)
            task.r2t_sn += 1
            self._send(bhs)
            return
        del self._writes[task.itt]
        if task.error is not None:
            return self._respond(task.itt, error=task.error)
        if task.ignore:
            return self._respond(task.itt)
        data = bytes(task.buf)
        if task.rw is None:
            op = self._command(task.cdb, data, task.t0)
            return self._start(task.itt, task.lun, 0, op, (0, 0))
        self._write_command(task.itt, task.lun, task.rw, task.edtl, data, task.t0)

    def _write_command(
        self, itt: int, lun: bytes, rw: S.Rw, edtl: int, data: bytes, t0: float
    ) -> None:
        """Write the whole blocks both the CDB and the Data-Out cover (an expected length
        that differs from the CDB's is answered with its residual, as SAM says)."""
        assert self.lun is not None and self.session is not None
        need = rw.blocks * S.BLOCK
        residual = (edtl - need, 0) if edtl > need else (0, need - edtl)
        blocks = min(len(data), need) // S.BLOCK
        if not blocks:
            return self._respond(itt, underflow=residual[0], overflow=residual[1])
        n = blocks * S.BLOCK
        self.count_written(n)
        self.session.record("w", rw.lba * S.BLOCK, n)
        part = S.Rw(True, rw.lba, blocks, rw.fua)
        self._start(itt, lun, 0, self._write(part, data[:n], t0), residual)

    async def _write(self, rw: S.Rw, data: bytes, t0: float) -> bytes:
        assert self.lun is not None
        try:
            await self.lun.write(rw, data)
            return b""
        finally:
            LATENCY["write"].observe(perf_counter() - t0)

    def _start(
        self,
        itt: int,
        lun: bytes,
        edtl: int,
        op: Coroutine[Any, Any, bytes | bytearray],
        data_out_residual: tuple[int, int] | None = None,
    ) -> None:
        """Run ``op`` as a task; its result is the command's Data-In (for a command that
        moved Data-Out, ``data_out_residual`` is its (underflow, overflow) instead)."""
        self.inflight += 1
        self._running.add(itt)
        self.spawn(self._finish(itt, lun, edtl, op, data_out_residual))

    async def _finish(
        self,
        itt: int,
        lun: bytes,
        edtl: int,
        op: Coroutine[Any, Any, bytes | bytearray],
        data_out_residual: tuple[int, int] | None,
    ) -> None:
        error: S.CheckCondition | None = None
        out: bytes | bytearray = b""
        try:
            out = await op
        except S.CheckCondition as e:
            error = e
        finally:
            self._task_done(itt)
        if itt in self._aborted:
            self._aborted.discard(itt)
        elif error is not None:
            self._respond(itt, error=error)
        elif data_out_residual is not None:
            self._respond(itt, underflow=data_out_residual[0], overflow=data_out_residual[1])
        else:
            self._respond_data(itt, lun, edtl, out)

    def _task_done(self, itt: int) -> None:
        self._running.discard(itt)
        self.inflight -= 1
        if self._reading_paused and self.inflight < MAX_INFLIGHT // 2 and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
            self.loop.call_soon(self._process)  # the PDUs that came before we paused

    def _respond(
        self,
        itt: int,
        error: S.CheckCondition | None = None,
        underflow: int = 0,
        overflow: int = 0,
        data_in_pdus: int = 0,
    ) -> None:
        """A SCSI Response: GOOD, or CHECK CONDITION with sense data."""
        flags = P.FLAG_FINAL
        if overflow:
            flags |= P.RESID_OVERFLOW
        elif underflow:
            flags |= P.RESID_UNDERFLOW
        bhs = P.header(P.OP_SCSI_RSP, flags, itt)
        self._status_fields(bhs)
        P.put32(bhs, 36, data_in_pdus)
        P.put32(bhs, 44, overflow or underflow)
        data = b""
        if error is not None:
            bhs[3] = S.CHECK_CONDITION
            sense = error.sense()
            data = len(sense).to_bytes(2, "big") + sense
        self._send(bhs, data)

    def _respond_data(
        self,
        itt: int,
        lun: bytes,
        edtl: int,
        data: bytes | bytearray | memoryview,
        pieces: list[Piece] | None = None,
    ) -> None:
        """Data-In PDUs of ``data`` (cut to ``edtl``), the GOOD status in the last. With
        ``pieces`` (and ``data`` empty) the bytes are sent from the files by sendfile."""
        n = len(data) if pieces is None else sum(p[2] for p in pieces)
        sent = min(n, edtl)
        flags = 0
        resid = 0
        if n > edtl:
            flags, resid = P.RESID_OVERFLOW, n - edtl
        elif n < edtl:
            flags, resid = P.RESID_UNDERFLOW, edtl - n
        if sent == 0:
            under = resid if flags == P.RESID_UNDERFLOW else 0
            return self._respond(itt, underflow=under, overflow=resid - under)
        view = memoryview(data)
        pos = 0
        sn = 0
        step = self.max_send_data
        while pos < sent:
            k = min(step, sent - pos)
            end = pos + k
            bhs = bytearray(P.BHS_LEN)
            if end == sent:
                stat_sn = self.stat_sn
                self.stat_sn = (stat_sn + 1) & 0xFFFFFFFF
                fl, status, res = P.FLAG_FINAL | P.DATA_STATUS | flags, S.GOOD, resid
            else:
                # A Data-In sequence ends at MaxBurstLength (F without status).
                stat_sn, status, res = 0, 0, 0
                fl = P.FLAG_FINAL if end % self.max_burst == 0 else 0
            DATA_IN.pack_into(
                bhs, 0, P.OP_DATA_IN, fl, status, 0, lun, itt, P.NO_TAG, stat_sn,
                self.exp_cmd_sn, self._max_cmd_sn(), sn, pos, res,
            )  # fmt: skip
            if pieces is None:
                self._send(bhs, view[pos:end])
            else:
                for buf in P.build(bhs, b"", self.header_digest, length=k):
                    self.write(buf)
                self._write_pieces(pieces, pos, k)
            pos, sn = end, sn + 1

    def _write_pieces(self, pieces: list[Piece], start: int, n: int) -> None:
        """Send bytes [start, start + n) of the pieces' concatenation, files by sendfile."""
        at = 0
        for fd, off, cnt in pieces:
            lo, hi = max(start, at), min(start + n, at + cnt)
            if lo < hi:
                if fd == ZERO_FD:
                    self.write(ZEROS[: hi - lo])
                else:
                    self.write_file(fd, off + lo - at, hi - lo)
            at += cnt
            if at >= start + n:
                return

    def _read(self, itt: int, lun: bytes, rw: S.Rw, edtl: int, t0: float) -> None:
        assert self.lun is not None and self.session is not None
        backend = self.lun.backend
        offset, length = rw.lba * S.BLOCK, rw.blocks * S.BLOCK
        try:
            pieces = backend.map_read(offset, length)
        except BlocksMissing as miss:
            return self._start(itt, lun, edtl, self._read_slow(rw, miss))
        self.count_read(length)
        self.session.record("r", offset, length)
        if (
            length >= SENDFILE_MIN
            and self.zero_copy
            and not self.data_digest
            and self.max_send_data <= len(ZEROS)
            and all_cached(pieces)
        ):
            self._respond_data(itt, lun, edtl, b"", pieces)
            LATENCY["read"].observe(perf_counter() - t0)
            return
        out = bytearray(length)
        try:
            done = read_into_nowait(pieces, memoryview(out))
        except OSError as e:
            log.warning("iscsi read %d+%d failed: %s", offset, length, e)
            return self._respond(itt, error=S.read_error())
        if done:
            self._respond_data(itt, lun, edtl, out)
            LATENCY["read"].observe(perf_counter() - t0)
            return
        self._start(itt, lun, edtl, self._read_slow(rw, None, pieces, out))

    async def _read_slow(
        self,
        rw: S.Rw,
        miss: BlocksMissing | None,
        pieces: list[Piece] | None = None,
        out: bytearray | None = None,
    ) -> bytes | bytearray:
        """A read that waits: for a remote store's blocks, or on the disk (in a thread)."""
        assert self.lun is not None
        offset, length = rw.lba * S.BLOCK, rw.blocks * S.BLOCK
        try:
            if miss is not None:
                await miss.fetch()
                data = await self.lun.backend.pread(offset, length)
                if self.session is not None:
                    self.count_read(length)
                    self.session.record("r", offset, length)
                return data
            assert pieces is not None and out is not None
            await self.loop.run_in_executor(None, read_into, pieces, memoryview(out))
            return out
        except OSError as e:
            log.warning("iscsi read %d+%d failed: %s", offset, length, e)
            raise S.read_error() from None

    async def _command(self, cdb: bytes, data: bytes, t0: float) -> bytes:
        assert self.lun is not None
        try:
            return await self.lun.execute(cdb, data)
        finally:
            LATENCY["other"].observe(perf_counter() - t0)
