"""Boot profiles: which blocks a vdisk version's boots read first, in the order they read them.

Learned from ``BlocksRequested`` events: for each session, the reads in its first
``window_s`` seconds (by the event's own ``t_ms``) are one *boot*. When a boot ends (its
window passed, the client said it has booted (``ClientBooted``), or the session closed), it
is folded into the version's profile: per 64 KiB
unit, in how many boots it was read and its mean first-read time. The profile is the units
read by at least half of the boots (every unit after the first boot), ordered by mean
first-read time and merged into extents. The first ``max_boots`` boots refine it; then it
is left alone. Profiles are JSON files under ``<data_dir>/cache/profiles``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.events import BlocksRequested
from shared.private_file import replace_private

log = logging.getLogger("streamboot.cache.profiles")

UNIT = 64 * 1024
# The stream sends BlocksRequested every second: after ClientBooted, wait for the last one.
BOOTED_GRACE_S = 2.0


@dataclass
class _Boot:
    key: str
    units: dict[int, int] = field(default_factory=dict)  # unit -> first t_ms
    timer: asyncio.TimerHandle | None = None


@dataclass
class Profile:
    key: str
    boots: int = 0
    # unit -> [boots that read it, sum of first-read t_ms]
    units: dict[int, list[int]] = field(default_factory=dict)
    extents: list[tuple[int, int]] = field(default_factory=list)

    def rebuild(self) -> None:
        need = 1 if self.boots <= 1 else (self.boots + 1) // 2
        chosen = sorted(
            (u for u, (c, _) in self.units.items() if c >= need),
            key=lambda u: (self.units[u][1] / self.units[u][0], u),
        )
        out: list[list[int]] = []
        for u in chosen:
            off = u * UNIT
            if out and out[-1][0] + out[-1][1] == off:
                out[-1][1] += UNIT
            else:
                out.append([off, UNIT])
        self.extents = [(o, n) for o, n in out]

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.extents)


Updated = Callable[[str, Profile], None]


class BootProfiles:
    def __init__(
        self, directory: Path, window_s: float, max_boots: int, on_update: Updated
    ) -> None:
        self.dir = directory
        self.window_ms = int(window_s * 1000)
        self.window_s = window_s
        self.max_boots = max_boots
        self.on_update = on_update
        self.profiles: dict[str, Profile] = {}
        self.boots: dict[str, _Boot] = {}
        self.finished: set[str] = set()
        self.booted_early: set[str] = set()

    @staticmethod
    def key(vdisk: str, version: int) -> str:
        return f"{vdisk}@{version}"

    def load(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("*.json"):
            try:
                raw = json.loads(p.read_text())
                prof = Profile(
                    raw["key"], raw["boots"], {int(u): v for u, v in raw["units"].items()}
                )
            except (OSError, ValueError, KeyError) as e:
                log.error("boot profile %s unreadable: %s", p, e)
                continue
            prof.rebuild()
            self.profiles[prof.key] = prof

    def extents(self, vdisk: str, version: int) -> list[tuple[int, int]]:
        prof = self.profiles.get(self.key(vdisk, version))
        return prof.extents if prof else []

    def observe(self, event: BlocksRequested) -> None:
        """One BlocksRequested event."""
        sid = event.session_id
        if sid in self.finished:
            return
        key = self.key(event.vdisk, event.version)
        prof = self.profiles.get(key)
        if prof is not None and prof.boots >= self.max_boots:
            return
        boot = self.boots.get(sid)
        if boot is None:
            boot = self.boots[sid] = _Boot(key)
            # Wall-clock backstop: a client that goes quiet still ends its boot.
            loop = asyncio.get_running_loop()
            wait = BOOTED_GRACE_S if sid in self.booted_early else self.window_s + 10
            self.booted_early.discard(sid)
            boot.timer = loop.call_later(wait, self.end_boot, sid)
        past_window = False
        for t_ms, offset, length, op in event.extents:
            if t_ms > self.window_ms:
                past_window = True
                continue
            if op != "r":
                continue
            for u in range(offset // UNIT, (offset + length - 1) // UNIT + 1):
                boot.units.setdefault(u, t_ms)
        if past_window:
            self.end_boot(sid)

    def booted(self, session_id: str) -> None:
        """The client said it has booted (ClientBooted): its boot ends once the last
        BlocksRequested batch of the boot had time to arrive."""
        boot = self.boots.get(session_id)
        if boot is None:
            # Before its first batch arrived (batches trail by up to a second).
            self.booted_early.add(session_id)
            return
        if boot.timer is not None:
            boot.timer.cancel()
        loop = asyncio.get_running_loop()
        boot.timer = loop.call_later(BOOTED_GRACE_S, self.end_boot, session_id)

    def end_boot(self, session_id: str) -> None:
        boot = self.boots.pop(session_id, None)
        if boot is None:
            return
        self.finished.add(session_id)
        if boot.timer is not None:
            boot.timer.cancel()
        if not boot.units:
            return
        prof = self.profiles.setdefault(boot.key, Profile(boot.key))
        prof.boots += 1
        for u, t in boot.units.items():
            c = prof.units.setdefault(u, [0, 0])
            c[0] += 1
            c[1] += t
        prof.rebuild()
        self._save(prof)
        log.info("boot profile %s: %d boots, %d bytes", prof.key, prof.boots, prof.bytes)
        self.on_update(prof.key, prof)

    def _save(self, prof: Profile) -> None:
        path = self.dir / f"{prof.key.replace('/', '_')}.json"
        replace_private(
            path, json.dumps({"key": prof.key, "boots": prof.boots, "units": prof.units})
        )
