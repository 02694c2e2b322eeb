"""The console's live view of the system, fed by the event stream on NATS.

The registry's relay publishes every event of the log on ``events.<Type>.<kind>`` once it
is stored; this follows that subject (a core subscription: nothing durable, a console that
starts again reads its recent past from the log first) and keeps what the pages show
live: each machine's current boot run through the boot state machine
(shared/boot_flow.py), boots of the last hour, time-to-booted, live sessions' bytes. Browsers
listen through server-sent events: each change wakes the open streams, which render the
fragments they show (the browser never polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from services.registry.jobs import Jobs
from shared.boot_flow import BootFlow, belongs_to_a_boot, parse_event, starts_new_boot
from shared.bus import EVENTS_SUBJECTS
from shared.envelope import Envelope
from shared.event_store import EventStore

log = logging.getLogger("streamboot.registry.console")

# Machines whose latest boot is kept; the oldest drops out past this.
MAX_BOOTS = 500
# Live sessions whose bytes are followed; past this a session shows its ended
# connections' bytes only.
MAX_LIVE_SESSIONS = 100_000
# How much of the log's recent past the view starts from.
SEED_EVENTS = 5000
HOUR = timedelta(hours=1)
# An event as the view takes it: (position, type, data, time).
Seen = tuple[int, str, dict[str, Any], datetime]


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class LiveView:
    """What the console shows live; fed event by event, in log order."""

    def __init__(self) -> None:
        self.position = 0
        # MAC -> its latest boot, most recently active last.
        self.boots: OrderedDict[str, BootFlow] = OrderedDict()
        self._mac_of_session: dict[str, str] = {}
        self._starts: deque[datetime] = deque()
        self._booted: deque[tuple[datetime, float]] = deque()
        # Live sessions' data moved so far, by stream node: session id -> node -> (read,
        # written), the totals each node's BlocksRequested carries.
        self.live_bytes: dict[str, dict[str, tuple[int, int]]] = {}
        self._bytes_shown_at = 0.0
        self._changed = asyncio.Event()
        self.version = 0
        self.closed = False  # set when the process stops: live streams end

    def feed(self, position: int, type_: str, data: dict[str, Any], at: datetime) -> bool:
        """One event of the log; False when it was seen already (a relay's re-publish)."""
        if position and position <= self.position:
            return False
        self.position = max(self.position, position)
        if type_ == "BlocksRequested" and data.get("stream_node"):
            self._moved_on(data)
        elif type_ == "SessionClosed":
            self.live_bytes.pop(str(data.get("session_id")), None)
        event = parse_event(type_, data)
        if event is None or not belongs_to_a_boot(event):
            return True
        mac = data.get("mac") or self._mac_of_session.get(str(data.get("session_id")))
        if not isinstance(mac, str):
            return True
        if type_ == "SessionOpened":
            self._mac_of_session[str(data["session_id"])] = mac
        flow = self.boots.get(mac)
        if starts_new_boot(flow, event):
            flow = BootFlow(mac=mac)
            self._starts.append(at)
        assert flow is not None
        before = flow.phase
        flow.advance(event, at)
        if flow.phase != before and flow.phase == "booted" and flow.started is not None:
            self._booted.append((at, (at - flow.started).total_seconds()))
        self.boots[mac] = flow
        self.boots.move_to_end(mac)
        while len(self.boots) > MAX_BOOTS:
            _, old = self.boots.popitem(last=False)
            if old.session_id:
                self._mac_of_session.pop(old.session_id, None)
        self.version += 1
        self._changed.set()
        return True

    def _moved_on(self, data: dict[str, Any]) -> None:
        sid = str(data.get("session_id"))
        if sid not in self.live_bytes and len(self.live_bytes) >= MAX_LIVE_SESSIONS:
            return  # past the bound: shown from its SessionDetached events only
        try:
            moved = (int(data.get("bytes_read", 0)), int(data.get("bytes_written", 0)))
        except (TypeError, ValueError):
            return
        self.live_bytes.setdefault(sid, {})[str(data["stream_node"])] = moved
        # A page shows the bytes live, re-rendered at most once a second for them (every
        # active session reports each second).
        now = time.monotonic()
        if now - self._bytes_shown_at >= 1.0:
            self._bytes_shown_at = now
            self.version += 1
            self._changed.set()

    def with_bytes(self, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sessions (the registry's views) with the data they moved so far: the stream
        nodes' live totals, or what their ended connections counted (SessionDetached) when
        that is more (a stream node that restarted counts again from zero)."""
        for s in sessions:
            nodes = self.live_bytes.get(s["session_id"], {}).values()
            s["bytes_read"] = max(int(s.get("bytes_read") or 0), sum(r for r, _ in nodes))
            s["bytes_written"] = max(int(s.get("bytes_written") or 0), sum(w for _, w in nodes))
        return sessions

    def figures(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        while self._starts and self._starts[0] < now - HOUR:
            self._starts.popleft()
        while self._booted and self._booted[0][0] < now - HOUR:
            self._booted.popleft()
        times = [s for _, s in self._booted]
        return {
            "boots_last_hour": len(self._starts),
            "booted_p50_s": percentile(times, 50),
            "booted_p95_s": percentile(times, 95),
        }

    def recent_boots(self, limit: int = 50) -> list[BootFlow]:
        """Machines' latest boots, the most recently active first."""
        return list(reversed(self.boots.values()))[:limit]

    def poke(self) -> None:
        """Something the pages show changed without an event (a job's progress)."""
        self.version += 1
        self._changed.set()

    def close(self) -> None:
        """End every live stream (the process is stopping)."""
        self.closed = True
        self.version += 1
        self._changed.set()

    async def wait_change(self, seen: int, timeout_s: float) -> int:
        """The view's version once it is past ``seen``, or after ``timeout_s`` (a burst
        of events is one change for whoever wakes after it)."""
        if self.version == seen:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.version


class LiveFeed:
    """The LiveView fed from the log's recent past, then from the event stream on NATS."""

    def __init__(self, store: EventStore, nc: NATS | None, node: str = "registry") -> None:
        self.view = LiveView()
        # Imports and commits (services/registry/jobs.py), shown live.
        self.jobs = Jobs(lambda: store.pool, node, self.view.poke)
        self._store = store
        self.nc = nc
        self._sub: Any = None
        self._pending: list[Seen] | None = []

    async def start(self) -> None:
        # Subscribe first, then read the past: what arrives meanwhile waits in _pending and
        # whatever both hold is taken once (by position).
        if self.nc is not None:
            self._sub = await self.nc.subscribe(EVENTS_SUBJECTS, cb=self._on_msg)
        self.jobs.run(self._store.session)
        past = await self._store.read_latest(SEED_EVENTS)
        self._feed((e.position, e.type, e.data, e.time) for e in past)
        pending, self._pending = self._pending or [], None
        self._feed(pending)

    async def stop(self) -> None:
        self.view.close()
        await self.jobs.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def _feed(self, events: Iterable[Seen]) -> None:
        for position, type_, data, at in events:
            self.view.feed(position, type_, data, at)

    async def _on_msg(self, msg: Msg) -> None:
        try:
            env = Envelope.model_validate_json(msg.data)
            position = int((msg.headers or {}).get("Streamboot-Position", "0"))
        except (ValidationError, ValueError) as exc:
            log.warning("console: an event on %s that is not an envelope: %s", msg.subject, exc)
            return
        at = env.time if env.time.tzinfo else env.time.replace(tzinfo=UTC)
        seen = (position, env.type, env.data, at)
        if self._pending is not None:
            self._pending.append(seen)
        else:
            self._feed([seen])
