"""What a client may tell the boot service about itself: that its OS has booted
(``/booted``) and notices for the operator (``/client/notice``).

Both arrive from the network, from machines the server does not control: a notice's kind
and text are checked before they become an event, and each session has a small budget of
reports so that one machine cannot fill the event log. The budget lives in this replica's
memory, bounded in the number of sessions it remembers (a forgotten session starts over:
the bound is per replica, which is what keeps the log's growth linear in the boots).
"""

from __future__ import annotations

import re
from collections import OrderedDict

_KIND = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_MESSAGE = 300
NOTICES_PER_SESSION = 16
TRACKED_SESSIONS = 4096


def notice_problem(kind: str, message: str) -> str | None:
    """Why this notice is refused (None: it is fine)."""
    if not _KIND.match(kind):
        return "kind must be a lower-case word of up to 32 characters ([a-z0-9-])"
    if not message:
        return "message is empty"
    if len(message) > MAX_MESSAGE:
        return f"message is longer than {MAX_MESSAGE} characters"
    if not message.isascii() or not message.isprintable():
        return "message must be one line of printable ASCII"
    return None


class ReportBudget:
    """How many reports of each kind a session has left."""

    def __init__(self, sessions: int = TRACKED_SESSIONS) -> None:
        self.sessions = sessions
        self._used: OrderedDict[tuple[str, str], int] = OrderedDict()

    def take(self, session_id: str, what: str, allowed: int) -> bool:
        """Spend one report of ``what`` for the session; False once ``allowed`` are spent."""
        key = (session_id, what)
        used = self._used.pop(key, 0)
        self._used[key] = used + 1
        while len(self._used) > self.sessions:
            self._used.popitem(last=False)
        return used < allowed
