"""A minimal blocking iSCSI initiator on a raw socket, for crafting good and bad PDUs in tests
(the real initiators are libiscsi's tools and QEMU)."""

from __future__ import annotations

import socket
import struct

import crc32c

from tests.stream.nbdraw import recv_exact

INITIATOR = "iqn.2026-12.test:raw"


def _digest(data: bytes) -> bytes:
    return crc32c.crc32c(data).to_bytes(4, "little")


class RawIscsi:
    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.itt = 1
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.header_digest = False
        # The session identifier of its logins (open-iscsi's OUI form, as iscsistart sends).
        self.isid = bytes.fromhex("00023d000001")
        self.initiator = INITIATOR

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def recv_pdu(self) -> tuple[bytes, bytes]:
        bhs = self.recv_exact(48)
        ahs = self.recv_exact(bhs[4] * 4)
        if self.header_digest:
            assert self.recv_exact(4) == _digest(bhs + ahs)
        n = int.from_bytes(bhs[5:8], "big")
        data = self.recv_exact(n + (-n & 3))[:n]
        return bhs, data

    def send_pdu(
        self, bhs: bytearray, data: bytes = b"", corrupt_header_digest: bool = False
    ) -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        out = bytes(bhs)
        if self.header_digest:
            d = bytearray(_digest(bytes(bhs)))
            if corrupt_header_digest:
                d[0] ^= 0xFF
            out += bytes(d)
        out += data + bytes(-len(data) & 3)
        self.sock.sendall(out)

    def login(self, target: str, expect_ok: bool = True, header_digest: bool = False) -> int:
        """One login PDU from the operational stage straight to full feature phase; the
        login status (class << 8 | detail)."""
        keys = {
            "InitiatorName": self.initiator,
            "SessionType": "Normal",
            "TargetName": target,
            "HeaderDigest": "CRC32C" if header_digest else "None",
            "DataDigest": "None",
            "MaxRecvDataSegmentLength": "262144",
        }
        status = self.login_step(1, 3, keys)
        if expect_ok:
            assert status == 0, f"login status {status:#06x}"
            self.header_digest = header_digest
        return status

    def login_step(self, csg: int, nsg: int, keys: dict[str, str], transit: bool = True) -> int:
        """One login request moving from stage ``csg`` to ``nsg`` (staying in ``csg``
        without ``transit``); its login status."""
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        bhs = bytearray(48)
        bhs[0] = 0x43
        bhs[1] = (0x80 | nsg if transit else 0) | (csg << 2)
        bhs[8:14] = self.isid
        struct.pack_into(">IHxxII", bhs, 16, self.itt, 0, self.cmd_sn, self.exp_stat_sn)
        self.itt += 1
        self.send_pdu(bhs, text)
        rsp, data = self.recv_pdu()
        assert rsp[0] & 0x3F == 0x23
        self.exp_stat_sn = struct.unpack_from(">I", rsp, 24)[0] + 1
        # The target's keys and whether it moved on (T bit), for multi-step logins (CHAP).
        pairs = (kv.split("=", 1) for kv in bytes(data).decode().split("\0") if kv)
        self.login_keys = dict(pairs)
        self.login_transit = bool(rsp[1] & 0x80)
        return rsp[36] << 8 | rsp[37]

    def scsi_bhs(self, cdb: bytes, edtl: int, read: bool = False, write: bool = False) -> bytearray:
        bhs = bytearray(48)
        bhs[0] = 0x01
        bhs[1] = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
        struct.pack_into(">IIII", bhs, 16, self.itt, edtl, self.cmd_sn, self.exp_stat_sn)
        bhs[32 : 32 + len(cdb)] = cdb
        self.itt += 1
        self.cmd_sn += 1
        return bhs

    def command(
        self, cdb: bytes, edtl: int, data_out: bytes = b"", lun: int = 0
    ) -> tuple[int, bytes]:
        """(SCSI status, Data-In bytes or the sense data) of one command to ``lun`` (single
        level, peripheral addressing); Data-Out only as immediate data."""
        read = edtl > 0 and not data_out
        bhs = self.scsi_bhs(cdb, edtl, read=read, write=bool(data_out))
        bhs[8:10] = lun.to_bytes(2, "big")
        self.send_pdu(bhs, data_out)
        got = b""
        while True:
            bhs, data = self.recv_pdu()
            op = bhs[0] & 0x3F
            if op == 0x25:  # Data-In
                got += data
                if bhs[1] & 0x01:
                    return bhs[3], got
            elif op == 0x21:  # SCSI Response
                if bhs[3] == 2:
                    n = int.from_bytes(data[:2], "big")
                    return 2, data[2 : 2 + n]
                return bhs[3], got
            else:
                raise AssertionError(f"unexpected PDU opcode {op:#x}")

    def read10(self, lba: int, blocks: int) -> tuple[int, bytes]:
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        return self.command(cdb, blocks * 512)

    def write10(self, lba: int, data: bytes) -> tuple[int, bytes]:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // 512, 0)
        return self.command(cdb, len(data), data)

    def closed_by_peer(self, timeout: float = 5) -> bool:
        """Whether the target closes the connection (reading away what it still sends)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
