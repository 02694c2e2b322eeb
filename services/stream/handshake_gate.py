"""A cap on the connections one client address may hold in their handshake at once.

A connection is in its handshake from its accept until it is attached to a session (NBD
options, the first HTTP request, the iSCSI login); the watchdog ends it after the
handshake timeout. Until then anyone can hold it without knowing a token, so one host
could take every descriptor of the node with sockets it never speaks on. Past the cap a
new connection from that address is closed at once; other addresses are not affected
(a lab behind one NAT address shares the cap: STREAMBOOT_STREAM_MAX_HANDSHAKES_PER_ADDRESS).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger(__name__)

# A refused address is named in the log at most this often.
LOG_EVERY_S = 60.0
# Addresses remembered for that (the oldest forgotten past it).
MAX_LOGGED = 1024


class HandshakeGate:
    def __init__(self, per_address: int) -> None:
        self.per_address = per_address  # 0 = no cap
        self.open: Counter[str] = Counter()
        self.refused = 0
        self._logged: dict[str, float] = {}

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host`` in; False (not counted) past the cap."""
        if self.per_address and self.open[host] >= self.per_address:
            self.refused += 1
            self._say(host)
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]

    def _say(self, host: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(host, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        self._logged[host] = now
        while len(self._logged) > MAX_LOGGED:
            del self._logged[next(iter(self._logged))]
        log.warning(
            "stream: %s holds %d connections in their handshake (the cap): new ones from it "
            "are closed at once (said once a minute; %d refused on this node so far)",
            host, self.per_address, self.refused,
        )  # fmt: skip
