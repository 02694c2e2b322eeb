"""Plain-socket probes the hostile-load tests share."""

from __future__ import annotations

import socket


def closed_at_once(port: int, source: str, said: int = 0) -> bool:
    """Whether a new connection from ``source`` to ``port`` is closed by the server with
    at most ``said`` bytes sent first (a greeting written before the server's check)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
    except ConnectionResetError:  # reset before connect() returned
        return True
    try:
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        return len(got) <= said
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()
