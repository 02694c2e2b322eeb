"""A cap on the connections one client address may hold at once in a state anyone can reach.

A stream node counts a connection from its accept until it is attached to a session (NBD
options, the first HTTP request, the iSCSI login); the boot HTTP server counts every open
connection (its clients, iPXE and the initramfs, hold one or two). Until then anyone can
hold such a connection without knowing a token, so one host could take every descriptor of
the process with sockets it never speaks on (or speaks a byte a second on: slowloris). Past
the cap a new connection from that address is closed at once; other addresses are not
affected (a lab behind one NAT address shares the cap: its setting raises it).

Many addresses together (one host with many source addresses, a botnet) are bounded by a
total: past it, a new connection is taken and the *oldest* counted one is closed to make
room. A real client's handshake or request takes milliseconds, so the oldest is nearly
always one that stalls on purpose; refusing the new one instead would lock every real
client out for as long as the attacker keeps the table full. The total defaults to half the
process's descriptor limit, so the node never runs out of descriptors on such connections.

Refusals are logged through a :class:`~shared.log_budget.LogBudget`: a few lines a minute,
then one summary naming the busiest addresses.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

from shared.log_budget import LogBudget

# Refusals named in full per interval; the rest are summed up at its end.
LOG_LINES = 5
LOG_INTERVAL_S = 60.0


def peer_host(peer: str) -> str:
    """The address part of a peer's "host:port" ("[v6]:port" too), as the caps count it."""
    return peer.rsplit(":", 1)[0].strip("[]")


def default_total(total: int) -> int:
    """The total cap a setting means: 0 = half the descriptor limit now, < 0 = none."""
    if total:
        return max(total, 0)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(soft // 2, 64) if soft != resource.RLIM_INFINITY else 1 << 19


class AddressCap:
    def __init__(
        self, per_address: int, logger: logging.Logger, name: str, what: str, total: int = -1
    ) -> None:
        self.per_address = per_address  # 0 = no cap
        self.total = default_total(total)  # 0 = no cap
        self.what = what  # what is counted, for the log: "connections in their handshake"
        self.open: Counter[str] = Counter()
        self.refused = 0  # over the per-address cap
        self.shed = 0  # closed to make room under the total
        self._held: OrderedDict[Hashable, tuple[str, Callable[[], None]]] = OrderedDict()
        self._log = LogBudget(logger, name, lines=LOG_LINES, interval_s=LOG_INTERVAL_S)

    def admit(self, key: Hashable, host: str, shed: Callable[[], None] = lambda: None) -> bool:
        """Count connection ``key`` from ``host`` in; False (not counted) past the cap. At
        the total, the oldest counted connection is released and ``shed`` (its close) called."""
        if self.per_address and self.open[host] >= self.per_address:
            self.refused += 1
            self._log.log(
                logging.WARNING, "refused: at the cap", host,
                "%s: %s holds %d %s (the cap): new ones from it are closed at once "
                "(%d refused so far)",
                self._log.name, host, self.per_address, self.what, self.refused,
            )  # fmt: skip
            return False
        if self.total and len(self._held) >= self.total:
            _, (oldest, close) = self._held.popitem(last=False)
            self._drop(oldest)
            self.shed += 1
            self._log.log(
                logging.WARNING, "shed: at the total", oldest,
                "%s: %d %s (the total): the oldest, from %s, is closed to make room "
                "(%d closed so far)",
                self._log.name, self.total, self.what, oldest, self.shed,
            )  # fmt: skip
            close()
        self.open[host] += 1
        self._held[key] = (host, shed)
        return True

    def release(self, key: Hashable) -> None:
        """``key`` is no longer counted (done, or gone); nothing if it was not."""
        held = self._held.pop(key, None)
        if held is not None:
            self._drop(held[0])

    def _drop(self, host: str) -> None:
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]
