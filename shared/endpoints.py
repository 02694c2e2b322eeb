"""A network endpoint as text: "host:port", with an IPv6 address in brackets ("[v6]:port"),
as URLs, NBD clients and the client's failover helper take it."""

from __future__ import annotations

import ipaddress
import re

# A host name or IPv4 address as the client's helper dials it (streamboot-nbd.c's
# parse_node): letters, digits, dots and dashes, starting with a letter or digit.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def host_port(host: str, port: int) -> str:
    """``host:port``; an IPv6 address gets its brackets (``[::1]:10809``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_ok(endpoint: str) -> bool:
    """Whether ``endpoint`` is a "host:port" or "[IPv6]:port" the client's helper can dial:
    a port from 1 to 65535; an IPv6 address without a zone (a zone names an interface of
    the server, not the client's)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not _PORT.match(port) or not 0 < int(port) < 65536:
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return "%" not in host
    return _NAME.match(host) is not None
