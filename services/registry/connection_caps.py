"""What one host can hold of the admin API's connections: a cap per client address, a total
on connections waiting for a request head, and a time limit on each head.

uvicorn takes every connection and waits for a request head as long as the client likes (its
keep-alive timeout starts only after a first answer and stops at the next byte), so one host
could hold every descriptor of the registry with sockets that never speak or speak a byte a
second (slowloris); the token is checked only once a head is complete. Here uvicorn's h11
protocol counts each connection in :class:`shared.address_cap.AddressCap`, as the boot HTTP
server and the stream nodes do: past ``per_address`` open connections a new one from that
address is closed at once; past ``max_waiting`` connections waiting for a head (all
addresses together) the oldest waiting one is closed to make room; a head not complete
``head_timeout_s`` after the connection (or the previous answer) is answered 408 and closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.address_cap import AddressCap

log = logging.getLogger("streamboot.registry.api")

_BODY = b"request timeout\n"
HEAD_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


@dataclass
class ConnectionCaps:
    per_address: int  # open connections per client address; 0 = no cap
    max_waiting: int  # waiting for a head, all addresses; 0 = half the descriptor limit
    head_timeout_s: float
    connections: AddressCap = field(init=False)
    waiting: AddressCap = field(init=False)

    def __post_init__(self) -> None:
        self.connections = AddressCap(self.per_address, log, "api", "open connections")
        self.waiting = AddressCap(
            0, log, "api", "connections waiting for a request", total=self.max_waiting
        )

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's ``http`` protocol class counting its connections in these caps."""
        return type("CappedH11Protocol", (CappedH11Protocol,), {"caps": self})


class CappedH11Protocol(H11Protocol):
    caps: ConnectionCaps  # set on the subclass ConnectionCaps.protocol() makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._host = str(self.client[0]).removeprefix("::ffff:") if self.client else "?"
        if not self.caps.connections.admit(self, self._host):
            transport.abort()
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.caps.connections.release(self)
        self._head_arrived()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head made a new request cycle
            self._head_arrived()

    def on_response_complete(self) -> None:
        # Kept alive: the next head is waited for under the same bounds (a pipelined one,
        # handled inside uvicorn's method, ends the wait at once).
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def _await_head(self) -> None:
        self.caps.waiting.admit(self, self._host, self.transport.abort)
        self._head_timer = self.loop.call_later(self.caps.head_timeout_s, self._head_late)

    def _head_arrived(self) -> None:
        self.caps.waiting.release(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        self.caps.waiting.release(self)
        if self.transport.is_closing():
            return
        if self.cycle is None:  # nothing answered yet on it: say why it ends
            self.transport.write(HEAD_TIMEOUT_ANSWER)
        self.transport.close()
