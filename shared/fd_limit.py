"""File descriptors: the soft limit raised to the hard one at start, and what running out does.

A stream node holds one socket per attached client (10,000 idle ones is the design point) and
a cache node files per write cache; the usual soft limit (1,024) would stop them far below.
Every service raises its soft limit to the hard limit at start (:func:`raise_soft_limit`;
the hard limit is the operator's: systemd ``LimitNOFILE``, ``ulimit -Hn``, a container's
``nofile``) and reports both with its open count in its heartbeat (``streamboot status``).

Running out anyway is logged through a :class:`~shared.log_budget.LogBudget`: the first
refusal of each :data:`REPORT_INTERVAL_S` in full, the rest summed up in one line at its end,
not a line per refused client (a storm that hits the limit makes thousands of attempts).
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass, field
from typing import Any

from shared.log_budget import LogBudget

log = logging.getLogger("streamboot.fds")

REPORT_INTERVAL_S = 10.0
# When the hard limit is unlimited, the kernel still caps a process at fs.nr_open.
NR_OPEN = "/proc/sys/fs/nr_open"


def raise_soft_limit() -> tuple[int, int]:
    """Set RLIMIT_NOFILE's soft limit to its hard limit; return (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(open(NR_OPEN).read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_count() -> int:
    """File descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return -1


class _OpenCount:
    """The open count, read only when a line is written (a listing of /proc/self/fd)."""

    def __str__(self) -> str:
        return str(open_count())


@dataclass
class Exhaustion:
    """Connections refused for want of a file descriptor, and the rate-limited line saying so."""

    refused: int = 0
    _log: LogBudget = field(
        default_factory=lambda: LogBudget(log, "fds", lines=1, interval_s=REPORT_INTERVAL_S)
    )

    def refused_one(self, listener: str) -> None:
        self.refused += 1
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._log.log(
            logging.ERROR, "refused: out of file descriptors", listener,
            "out of file descriptors (%s open, limit %d, hard limit %d): %s refuses new "
            "connections (%d refused so far); raise the hard limit "
            "(systemd LimitNOFILE, ulimit -Hn) or spread clients over more nodes",
            _OpenCount(), soft, hard, listener, self.refused,
        )  # fmt: skip


# One per process: every listener of a process draws on the same descriptor table.
EXHAUSTION = Exhaustion()


def fd_vitals() -> dict[str, Any]:
    """The heartbeat's ``fds``: open descriptors, the limits, connections refused for want."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"open": open_count(), "soft": soft, "hard": hard, "refused": EXHAUSTION.refused}
