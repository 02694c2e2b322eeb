"""The SCSI block commands (SBC-3/SPC-4 subset) of one logical unit over a session's backend.

The iSCSI connection moves the bytes; this module decodes CDBs, checks them, and answers
with data and sense. READ and WRITE are decoded here (:func:`decode_rw`) but their data is
moved by the connection, which reads clean blocks straight from the page cache; everything
else runs in :meth:`Lun.execute`.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import NamedTuple

from services.stream.path.backend import STATE_HOLE, Backend

log = logging.getLogger(__name__)

BLOCK = 512
# Largest READ/WRITE/VERIFY in blocks (VPD B0 says so; initiators split larger requests).
MAX_TRANSFER_BLOCKS = 2048
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCRIPTORS = 64
MAX_WRITE_SAME_BLOCKS = 1 << 15

GOOD = 0x00
CHECK_CONDITION = 0x02

# Sense keys.
NO_SENSE = 0x0
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7
MISCOMPARE = 0xE


class CheckCondition(Exception):
    def __init__(self, key: int, asc: int, ascq: int = 0, info: int | None = None) -> None:
        super().__init__(f"sense {key:x}/{asc:02x}/{ascq:02x}")
        self.key, self.asc, self.ascq, self.info = key, asc, ascq, info

    def sense(self) -> bytes:
        """Fixed-format sense data (SPC-4 4.5.3)."""
        s = bytearray(18)
        s[0] = 0x70 | (0x80 if self.info is not None else 0)
        s[2] = self.key
        if self.info is not None:
            struct.pack_into(">I", s, 3, self.info & 0xFFFFFFFF)
        s[7] = 10
        s[12], s[13] = self.asc, self.ascq
        return bytes(s)


def invalid_opcode() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x20)


def invalid_field() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x24)


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x21)


def write_protected() -> CheckCondition:
    return CheckCondition(DATA_PROTECT, 0x27)


def lun_not_supported() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x25)


def read_error() -> CheckCondition:
    return CheckCondition(MEDIUM_ERROR, 0x11)


def write_error() -> CheckCondition:
    return CheckCondition(MEDIUM_ERROR, 0x0C)


class Rw(NamedTuple):  # a tuple: built for every READ and WRITE
    write: bool
    lba: int
    blocks: int
    fua: bool


# opcode -> (write, LBA offset, LBA size, length offset, length size)
_RW = {
    0x08: (False, 1, 3, 4, 1),
    0x28: (False, 2, 4, 7, 2),
    0xA8: (False, 2, 4, 6, 4),
    0x88: (False, 2, 8, 10, 4),
    0x0A: (True, 1, 3, 4, 1),
    0x2A: (True, 2, 4, 7, 2),
    0xAA: (True, 2, 4, 6, 4),
    0x8A: (True, 2, 8, 10, 4),
    # WRITE AND VERIFY 10/12/16: a write that is on the medium when answered (as FUA), so
    # the verify after it cannot differ.
    0x2E: (True, 2, 4, 7, 2),
    0xAE: (True, 2, 4, 6, 4),
    0x8E: (True, 2, 8, 10, 4),
}
_WRITE_VERIFY = (0x2E, 0xAE, 0x8E)


def decode_rw(cdb: bytes) -> Rw | None:
    """A READ/WRITE (6/10/12/16) CDB's transfer, or None for other commands;
    CheckCondition for a field we cannot honour."""
    shape = _RW.get(cdb[0])
    if shape is None:
        return None
    write, lo, ln, co, cn = shape
    if cdb[0] not in (0x08, 0x0A) and cdb[1] & 0xE0:
        raise invalid_field()  # RDPROTECT/WRPROTECT: the medium has no protection info
    lba = int.from_bytes(cdb[lo : lo + ln], "big")
    blocks = int.from_bytes(cdb[co : co + cn], "big")
    if cdb[0] in (0x08, 0x0A):
        lba &= 0x1FFFFF
        blocks = blocks or 256  # a 6-byte CDB's 0 means 256 blocks
        fua = False
    else:
        fua = cdb[0] in _WRITE_VERIFY or bool(cdb[1] & 0x08)
    return Rw(write, lba, blocks, fua)


def lba_range(cdb: bytes) -> tuple[int, int]:
    """(LBA, blocks) of a 10-byte (opcodes below 0x80) or 16-byte CDB."""
    if cdb[0] < 0x80:
        return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")


def vdisk_id(vdisk: str) -> bytes:
    """A stable 8-byte NAA locally-assigned (type 3) identifier of a vdisk."""
    h = bytearray(hashlib.sha256(b"streamboot-vdisk:" + vdisk.encode()).digest()[:8])
    h[0] = 0x30 | (h[0] & 0x0F)
    return bytes(h)


class Lun:
    """LUN 0 of a target: the session's backend as a direct-access block device."""

    def __init__(self, backend: Backend, vdisk: str) -> None:
        self.backend = backend
        self.vdisk = vdisk
        self.blocks = backend.size // BLOCK
        self.read_only = not backend.can_write()
        self.can_unmap = not self.read_only and backend.can_trim()

    def check_rw(self, rw: Rw, edtl: int) -> None:
        if rw.write and self.read_only:
            raise write_protected()
        if rw.lba + rw.blocks > self.blocks:
            raise lba_out_of_range()
        if rw.blocks > MAX_TRANSFER_BLOCKS:
            raise invalid_field()

    async def write(self, rw: Rw, data: bytes) -> None:
        try:
            await self.backend.pwrite(rw.lba * BLOCK, data, rw.fua)
        except PermissionError:
            raise write_protected() from None
        except OSError as e:
            log.warning("iscsi write at block %d failed: %s", rw.lba, e)
            raise write_error() from None

    async def execute(self, cdb: bytes, data_out: bytes) -> bytes:
        """Run a non-READ/WRITE command; its Data-In bytes (the caller truncates them to
        the allocation length it was asked for). CheckCondition for errors."""
        op = cdb[0]
        handler = _HANDLERS.get(op)
        if handler is None:
            raise invalid_opcode()
        return await handler(self, cdb, data_out)

    # --- commands --------------------------------------------------------------------------

    async def _test_unit_ready(self, cdb: bytes, data: bytes) -> bytes:
        return b""

    async def _request_sense(self, cdb: bytes, data: bytes) -> bytes:
        if cdb[1] & 0x01:  # descriptor format: we only keep fixed
            raise invalid_field()
        return CheckCondition(NO_SENSE, 0).sense()[: cdb[4]]

    async def _inquiry(self, cdb: bytes, data: bytes) -> bytes:
        alloc = int.from_bytes(cdb[3:5], "big")
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise invalid_field()
            return standard_inquiry()[:alloc]
        page = _VPD.get(cdb[2])
        if page is None:
            raise invalid_field()
        body = page(self)
        return (bytes([0, cdb[2]]) + struct.pack(">H", len(body)) + body)[:alloc]

    def _vpd_pages(self) -> bytes:
        return bytes(sorted(_VPD))

    def _vpd_serial(self) -> bytes:
        return vdisk_id(self.vdisk).hex().encode()

    def _vpd_identification(self) -> bytes:
        naa = vdisk_id(self.vdisk)
        t10 = b"STRMBOOT" + self.vdisk.encode()[:64]
        return bytes([0x01, 0x03, 0x00, len(naa)]) + naa + bytes([0x02, 0x01, 0x00, len(t10)]) + t10

    def _vpd_block_limits(self) -> bytes:
        b = bytearray(0x3C)
        b[0] = 0x01  # WSNZ: WRITE SAME of 0 blocks ("to the end") is refused
        struct.pack_into(">I", b, 4, MAX_TRANSFER_BLOCKS)
        struct.pack_into(">I", b, 8, MAX_TRANSFER_BLOCKS)
        if self.can_unmap:
            struct.pack_into(">I", b, 16, MAX_UNMAP_BLOCKS)
            struct.pack_into(">I", b, 20, MAX_UNMAP_DESCRIPTORS)
            struct.pack_into(">I", b, 24, 1)
        struct.pack_into(">Q", b, 32, MAX_WRITE_SAME_BLOCKS)
        return bytes(b)

    def _vpd_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        struct.pack_into(">H", b, 0, 1)  # non-rotating medium
        return bytes(b)

    def _vpd_provisioning(self) -> bytes:
        if not self.can_unmap:
            return bytes(4)
        # LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read zeros); thin provisioned.
        return bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])

    async def _read_capacity10(self, cdb: bytes, data: bytes) -> bytes:
        last = self.blocks - 1
        return struct.pack(">II", min(last, 0xFFFFFFFF), BLOCK)

    async def _service_action_in(self, cdb: bytes, data: bytes) -> bytes:
        sa = cdb[1] & 0x1F
        alloc = int.from_bytes(cdb[10:14], "big")
        if sa == 0x10:
            out = bytearray(32)
            struct.pack_into(">QI", out, 0, self.blocks - 1, BLOCK)
            if self.can_unmap:
                out[14] = 0x80 | 0x40  # LBPME, LBPRZ
            return bytes(out[:alloc])
        if sa == 0x12:
            return (await self._lba_status(cdb))[:alloc]
        raise invalid_field()

    async def _lba_status(self, cdb: bytes) -> bytes:
        lba = int.from_bytes(cdb[2:10], "big")
        if lba >= self.blocks:
            raise lba_out_of_range()
        start, count, state = lba, self.blocks - lba, 0
        if self.backend.can_extents():
            span = min(count, 1 << 20) * BLOCK
            first = (await self.backend.extents(lba * BLOCK, span))[0]
            count = max(1, first[0] // BLOCK)
            state = 1 if first[1] & STATE_HOLE else 0
        desc = struct.pack(">QIB3x", start, min(count, 0xFFFFFFFF), state)
        return struct.pack(">I4x", 4 + len(desc)) + desc

    async def _sync_cache(self, cdb: bytes, data: bytes) -> bytes:
        lba, blocks = lba_range(cdb)
        if lba + blocks > self.blocks:
            raise lba_out_of_range()
        try:
            await self.backend.flush()
        except OSError as e:
            log.warning("iscsi flush failed: %s", e)
            raise write_error() from None
        return b""

    async def _prefetch(self, cdb: bytes, data: bytes) -> bytes:
        lba, blocks = lba_range(cdb)
        if lba + blocks > self.blocks:
            raise lba_out_of_range()
        return b""  # a hint: the read path has its own cache

    async def _verify(self, cdb: bytes, data: bytes) -> bytes:
        lba, blocks = lba_range(cdb)
        bytchk = (cdb[1] >> 1) & 0x03
        if cdb[1] & 0xE0:  # VRPROTECT
            raise invalid_field()
        if bytchk not in (0, 1):
            raise invalid_field()
        if lba + blocks > self.blocks:
            raise lba_out_of_range()
        if blocks > MAX_TRANSFER_BLOCKS:
            raise invalid_field()
        if bytchk and blocks:
            have = await self._pread(lba, blocks)
            if len(data) < len(have):
                raise CheckCondition(ILLEGAL_REQUEST, 0x1A)  # parameter list length error
            for i in range(len(have)):
                if have[i] != data[i]:
                    raise CheckCondition(MISCOMPARE, 0x1D, 0, info=i)
        return b""

    async def _pread(self, lba: int, blocks: int) -> bytes:
        try:
            return await self.backend.pread(lba * BLOCK, blocks * BLOCK)
        except OSError as e:
            log.warning("iscsi read at block %d failed: %s", lba, e)
            raise read_error() from None

    async def _write_same(self, cdb: bytes, data: bytes) -> bytes:
        lba, blocks = lba_range(cdb)
        ndob = cdb[0] == 0x93 and bool(cdb[1] & 0x01)
        unmap = bool(cdb[1] & 0x08)
        if self.read_only:
            raise write_protected()
        if cdb[1] & 0xF0 or (unmap and not self.can_unmap):  # WRPROTECT, ANCHOR
            raise invalid_field()
        if lba + blocks > self.blocks:
            raise lba_out_of_range()
        if blocks == 0 or blocks > MAX_WRITE_SAME_BLOCKS:
            raise invalid_field()  # 0 ("to the end") is refused: WSNZ in VPD B0
        pattern = bytes(BLOCK) if ndob else data[:BLOCK]
        if len(pattern) < BLOCK:
            raise CheckCondition(ILLEGAL_REQUEST, 0x1A)
        off, n = lba * BLOCK, blocks * BLOCK
        try:
            if not any(pattern):
                # Zeros: unmapped blocks read back zeros (LBPRZ), so both are a zero.
                await (self.backend.trim(off, n) if unmap else self.backend.zero(off, n))
            else:
                chunk = pattern * min(blocks, MAX_TRANSFER_BLOCKS)
                while n:
                    k = min(n, len(chunk))
                    await self.backend.pwrite(off, chunk[:k])
                    off, n = off + k, n - k
        except PermissionError:
            raise write_protected() from None
        except OSError as e:
            log.warning("iscsi write same at block %d failed: %s", lba, e)
            raise write_error() from None
        return b""

    async def _unmap(self, cdb: bytes, data: bytes) -> bytes:
        if self.read_only:
            raise write_protected()
        if not self.can_unmap or cdb[1] & 0x01:  # ANCHOR
            raise invalid_field()
        plen = int.from_bytes(cdb[7:9], "big")
        if plen == 0:
            return b""
        if plen < 8 or len(data) < plen:
            raise CheckCondition(ILLEGAL_REQUEST, 0x1A)
        dlen = int.from_bytes(data[2:4], "big")
        if dlen % 16 or 8 + dlen > plen:
            raise CheckCondition(ILLEGAL_REQUEST, 0x26)  # invalid field in parameter list
        ranges = [struct.unpack_from(">QI", data, p) for p in range(8, 8 + dlen, 16)]
        if len(ranges) > MAX_UNMAP_DESCRIPTORS:
            raise CheckCondition(ILLEGAL_REQUEST, 0x26)
        for lba, n in ranges:
            if lba + n > self.blocks:
                raise lba_out_of_range()
            if n > MAX_UNMAP_BLOCKS:
                raise CheckCondition(ILLEGAL_REQUEST, 0x26)
        try:
            for lba, n in ranges:
                if n:
                    await self.backend.trim(lba * BLOCK, n * BLOCK)
        except OSError as e:
            log.warning("iscsi unmap failed: %s", e)
            raise write_error() from None
        return b""

    async def _mode_sense(self, cdb: bytes, data: bytes) -> bytes:
        six = cdb[0] == 0x1A
        dbd = bool(cdb[1] & 0x08)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = cdb[4] if six else int.from_bytes(cdb[7:9], "big")
        if pc == 3:
            raise CheckCondition(ILLEGAL_REQUEST, 0x39)  # saving parameters not supported
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise invalid_field()
        pages = {0x08: self._caching_page(pc == 1), 0x0A: control_page(pc == 1)}
        if page == 0x3F:
            body = b"".join(pages[p] for p in sorted(pages))
        elif page in pages:
            body = pages[page]
        else:
            raise invalid_field()
        wp = 0x80 if self.read_only else 0
        blockdesc = b"" if dbd else struct.pack(">II", min(self.blocks, 0xFFFFFFFF), BLOCK)
        if six:
            head = bytes([len(blockdesc) + len(body) + 3, 0, wp | 0x10, len(blockdesc)])
        else:
            head = struct.pack(">HBBxxH", len(blockdesc) + len(body) + 6, 0, wp | 0x10,
                               len(blockdesc))  # fmt: skip
        return (head + blockdesc + body)[:alloc]

    def _caching_page(self, changeable: bool) -> bytes:
        p = bytearray(20)
        p[0], p[1] = 0x08, 0x12
        if not changeable and not self.read_only and self.backend.can_flush():
            p[2] = 0x04  # WCE: a write is durable after SYNCHRONIZE CACHE (or FUA)
        return bytes(p)

    async def _report_luns(self, cdb: bytes, data: bytes) -> bytes:
        alloc = int.from_bytes(cdb[6:10], "big")
        if alloc < 16:
            raise invalid_field()
        return (struct.pack(">I4x", 8) + bytes(8))[:alloc]

    async def _accept(self, cdb: bytes, data: bytes) -> bytes:
        return b""

    async def _maintenance_in(self, cdb: bytes, data: bytes) -> bytes:
        raise invalid_field()


def control_page(changeable: bool) -> bytes:
    p = bytearray(12)
    p[0], p[1] = 0x0A, 0x0A
    if not changeable:
        p[3] = 0x10  # queue algorithm modifier 1: unrestricted reordering
    return bytes(p)


def standard_inquiry() -> bytes:
    b = bytearray(66)
    b[0] = 0x00  # direct-access block device
    b[2] = 0x06  # SPC-4
    b[3] = 0x12  # HiSup, response data format 2
    b[4] = len(b) - 5
    b[7] = 0x02  # CmdQue
    b[8:16] = b"STRMBOOT"
    b[16:32] = b"streamboot vdisk"
    b[32:36] = b"0001"
    # Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    struct.pack_into(">HHHH", b, 58, 0x00A0, 0x0960, 0x0460, 0x04C0)
    return bytes(b)


def inquiry_no_lun(cdb: bytes) -> bytes:
    """INQUIRY to a LUN that does not exist: peripheral qualifier 3 (SPC-4 6.6.2)."""
    out = bytearray(standard_inquiry())
    out[0] = 0x7F
    return bytes(out[: int.from_bytes(cdb[3:5], "big")])


_VPD = {
    0x00: Lun._vpd_pages,
    0x80: Lun._vpd_serial,
    0x83: Lun._vpd_identification,
    0xB0: Lun._vpd_block_limits,
    0xB1: Lun._vpd_characteristics,
    0xB2: Lun._vpd_provisioning,
}

_HANDLERS = {
    0x00: Lun._test_unit_ready,
    0x03: Lun._request_sense,
    0x12: Lun._inquiry,
    0x1A: Lun._mode_sense,
    0x5A: Lun._mode_sense,
    0x1B: Lun._accept,  # START STOP UNIT: nothing to spin
    0x1E: Lun._accept,  # PREVENT ALLOW MEDIUM REMOVAL: not removable
    0x25: Lun._read_capacity10,
    0x9E: Lun._service_action_in,
    0x35: Lun._sync_cache,
    0x91: Lun._sync_cache,
    0x34: Lun._prefetch,
    0x90: Lun._prefetch,
    0x2F: Lun._verify,
    0x8F: Lun._verify,
    0x41: Lun._write_same,
    0x93: Lun._write_same,
    0x42: Lun._unmap,
    0xA0: Lun._report_luns,
    0xA3: Lun._maintenance_in,
}
