"""DHCP packets (RFC 2131/2132) with the PXE bits (RFC 4578): parsing and building.

Pure functions on bytes. Parsing never trusts the sender: anything malformed raises
:class:`DhcpParseError`. Options are kept as raw bytes by code; repeated options are
concatenated (RFC 3396), and the helpers below decode the few the boot service reads.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from dataclasses import dataclass, field

MAGIC = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
_HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")  # 236 bytes, then the magic cookie
BROADCAST_FLAG = 0x8000

# Message types (option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {
    DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
    ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM",
}  # fmt: skip

# Option codes.
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_VENDOR_SPECIFIC = 43
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_CLIENT_ARCH = 93  # RFC 4578: client system architecture
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97  # RFC 4578: client machine identifier (type 0 + 16 bytes)
OPT_IPXE_ENCAP = 175  # iPXE's own encapsulated options: only iPXE sends it

# RFC 4578 / IANA processor architecture types (option 93).
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7  # EFI byte code; in practice x86-64 firmware sends 7
ARCH_EFI_X64 = 9
ARCH_EFI_X64_HTTP = 16


class DhcpParseError(ValueError):
    pass


@dataclass
class DhcpPacket:
    op: int
    xid: int
    chaddr: bytes  # the client hardware address (hlen bytes)
    htype: int = 1
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    @property
    def mac(self) -> str:
        return ":".join(f"{b:02x}" for b in self.chaddr)


def parse(data: bytes) -> DhcpPacket:
    if len(data) < _HEADER.size + len(MAGIC):
        raise DhcpParseError(f"too short ({len(data)} bytes)")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
     sname, file) = _HEADER.unpack_from(data)  # fmt: skip
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise DhcpParseError(f"bad op {op}")
    if hlen == 0 or hlen > 16:
        raise DhcpParseError(f"bad hardware address length {hlen}")
    if data[_HEADER.size : _HEADER.size + 4] != MAGIC:
        raise DhcpParseError("no DHCP magic cookie (plain BOOTP is not served)")
    options: dict[int, bytes] = {}
    i, end = _HEADER.size + 4, len(data)
    while i < end:
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= end:
            raise DhcpParseError(f"option {code} truncated")
        length = data[i + 1]
        if i + 2 + length > end:
            raise DhcpParseError(f"option {code} overruns the packet")
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return DhcpPacket(
        op=op, xid=xid, chaddr=chaddr[:hlen], htype=htype, hops=hops, secs=secs, flags=flags,
        ciaddr=_ip(ciaddr), yiaddr=_ip(yiaddr), siaddr=_ip(siaddr), giaddr=_ip(giaddr),
        sname=sname.rstrip(b"\0"), file=file.rstrip(b"\0"), options=options,
    )  # fmt: skip


def build(packet: DhcpPacket) -> bytes:
    header = _HEADER.pack(
        packet.op, packet.htype, len(packet.chaddr), packet.hops, packet.xid, packet.secs,
        packet.flags, _int(packet.ciaddr), _int(packet.yiaddr), _int(packet.siaddr),
        _int(packet.giaddr), packet.chaddr, packet.sname, packet.file,
    )  # fmt: skip
    body = bytearray(header + MAGIC)
    for code, value in packet.options.items():
        # Longer than 255 bytes: split into several instances (RFC 3396).
        for start in range(0, max(len(value), 1), 255):
            chunk = value[start : start + 255]
            body += bytes((code, len(chunk))) + chunk
    body.append(OPT_END)
    if len(body) < 300:  # some BOOTP relays and old clients drop shorter packets
        body += bytes(300 - len(body))
    return bytes(body)


def _ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def _int(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def ip_bytes(*ips: str) -> bytes:
    return b"".join(ipaddress.IPv4Address(ip).packed for ip in ips)


# --- what a client says about itself ---------------------------------------------------


def client_arch(packet: DhcpPacket) -> int | None:
    """The first architecture of option 93 (a list of 16-bit types)."""
    value = packet.options.get(OPT_CLIENT_ARCH)
    if not value or len(value) < 2:
        return None
    return struct.unpack_from("!H", value)[0]


def is_pxe(packet: DhcpPacket) -> bool:
    return packet.options.get(OPT_VENDOR_CLASS, b"").startswith(b"PXEClient")


def is_ipxe(packet: DhcpPacket) -> bool:
    """iPXE sends its encapsulated options (175) and the user class "iPXE" (77, either
    raw or in RFC 3004 length-prefixed form: a substring test covers both)."""
    return OPT_IPXE_ENCAP in packet.options or b"iPXE" in packet.options.get(OPT_USER_CLASS, b"")


def client_uuid(packet: DhcpPacket) -> str | None:
    """The SMBIOS UUID of option 97 (type 0, then 16 bytes). Firmware sends it in the
    SMBIOS byte order (first three fields little-endian), which is how iPXE's ``${uuid}``
    and dmidecode print it."""
    value = packet.options.get(OPT_CLIENT_UUID)
    if not value or len(value) != 17 or value[0] != 0:
        return None
    return str(uuid.UUID(bytes_le=value[1:]))


def requested_ip(packet: DhcpPacket) -> str | None:
    value = packet.options.get(OPT_REQUESTED_IP)
    return _ip(struct.unpack("!I", value)[0]) if value and len(value) == 4 else None


def server_id(packet: DhcpPacket) -> str | None:
    value = packet.options.get(OPT_SERVER_ID)
    return _ip(struct.unpack("!I", value)[0]) if value and len(value) == 4 else None
