"""A cap on the connections one client address may hold at once in a state anyone can reach.

A stream node counts a connection from its accept until it is attached to a session (NBD
options, the first HTTP request, the iSCSI login); the boot HTTP server counts every open
connection (its clients, iPXE and the initramfs, hold one or two). Until then anyone can
hold such a connection without knowing a token, so one host could take every descriptor of
the process with sockets it never speaks on (or speaks a byte a second on: slowloris). Past
the cap a new connection from that address is closed at once; other addresses are not
affected (a lab behind one NAT address shares the cap: its setting raises it).

Refusals are logged through a :class:`~shared.log_budget.LogBudget`: a few lines a minute,
then one summary naming the busiest addresses.
"""

from __future__ import annotations

import logging
from collections import Counter

from shared.log_budget import LogBudget

# Refusals named in full per interval; the rest are summed up at its end.
LOG_LINES = 5
LOG_INTERVAL_S = 60.0


class AddressCap:
    def __init__(self, per_address: int, logger: logging.Logger, name: str, what: str) -> None:
        self.per_address = per_address  # 0 = no cap
        self.what = what  # what is counted, for the log: "connections in their handshake"
        self.open: Counter[str] = Counter()
        self.refused = 0
        self._log = LogBudget(logger, name, lines=LOG_LINES, interval_s=LOG_INTERVAL_S)

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host`` in; False (not counted) past the cap."""
        if self.per_address and self.open[host] >= self.per_address:
            self.refused += 1
            self._log.log(
                logging.WARNING, "refused: at the cap", host,
                "%s: %s holds %d %s (the cap): new ones from it are closed at once "
                "(%d refused so far)",
                self._log.name, host, self.per_address, self.what, self.refused,
            )  # fmt: skip
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]
