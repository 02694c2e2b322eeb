"""The live client of the fault suite: QEMU's NBD client (qemu-io on one long connection,
``reconnect-delay`` set, as a guest's QEMU would be) writing patterns with FUA and flushes,
and the ledger of what the server acknowledged.

Each write fills one 64 KiB slot with a one-byte pattern that differs from the slot's
previous one, so a lost write shows as the older pattern when the disk is read back.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOT = 64 * 1024
BLOCK = 4096
# qemu-io reads its next command once the last one is done, and says so with its prompt
# (one command at a time: a second line sent at once waits for more input).
PROMPT = b"qemu-io> "
# One command that takes longer is a hang (the server neither answered nor failed it).
OP_TIMEOUT_S = 120.0


@dataclass
class Slot:
    acked: int = 0  # the pattern of the latest write the server acknowledged
    durable: int = 0  # ...of the latest one acknowledged with FUA or before a FLUSH reply
    unflushed: list[int] = field(default_factory=list)  # acknowledged since `durable`
    tried: set[int] = field(default_factory=set)  # failed since `acked`: either may be there


@dataclass
class Op:
    at: float  # monotonic time the command was sent
    took: float
    ok: bool
    error: str = ""


class LiveClient:
    """qemu-io (in ``netns`` when given) writing through ``nbd_uri`` until stopped."""

    def __init__(self, nbd_uri: str, size: int, netns: str | None = None) -> None:
        u = urlsplit(nbd_uri)
        opts = (
            f"driver=nbd,server.type=inet,server.host={u.hostname},server.port={u.port},"
            f"export={u.path.lstrip('/')},reconnect-delay=60"
        )
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [*prefix, "stdbuf", "-oL", "qemu-io", "--image-opts", opts],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
        )
        self.slots = [Slot() for _ in range(size // SLOT)]
        self.ops: list[Op] = []
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure = ""  # set when the client itself broke (hang, exit)

    # --- one command ---------------------------------------------------------------------

    def _until_prompt(self) -> str:
        """qemu-io's output up to its next prompt (printed once a command is done)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        while not out.endswith(PROMPT):
            got = os.read(fd, 4096)
            if not got:
                raise RuntimeError(f"qemu-io exited: {out.decode(errors='replace')}")
            out += got
        return out[: -len(PROMPT)].decode(errors="replace")

    def _command(self, line: str) -> Op:
        assert self.proc.stdin is not None
        start = time.monotonic()
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        out = self._until_prompt().splitlines()
        failed = [x for x in out if "failed" in x or "error" in x.lower()]
        op = Op(start, time.monotonic() - start, not failed, "".join(failed).strip())
        self.ops.append(op)
        return op

    def _write(self, fua: bool) -> None:
        n = self.writes
        self.writes += 1
        slot = self.slots[n % len(self.slots)]
        pattern = n % 251 + 1
        if pattern == slot.acked:
            pattern = pattern % 251 + 1
        op = self._command(
            f"write {'-f ' if fua else ''}-P {pattern} {(n % len(self.slots)) * SLOT} {SLOT}"
        )
        if not op.ok:
            slot.tried.add(pattern)
            return
        slot.acked, slot.tried = pattern, set()
        if fua:
            slot.durable, slot.unflushed = pattern, []
        else:
            slot.unflushed.append(pattern)

    def _flush(self) -> None:
        if self._command("flush").ok:
            for slot in self.slots:
                if slot.unflushed:
                    slot.durable, slot.unflushed = slot.unflushed[-1], []

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._write(fua=self.writes % 3 == 0)
                if self.writes % 4 == 0:
                    self._flush()
        except Exception as e:  # reported by stop(): the test fails on it
            self.failure = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self._until_prompt()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the command in flight (a hang fails after OP_TIMEOUT_S) and quit."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(OP_TIMEOUT_S)
        if self._thread.is_alive():
            self.failure = self.failure or "a command hung (no reply, no error)"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    # --- what it saw ---------------------------------------------------------------------

    def last_ok_before(self, t: float) -> float | None:
        done = [op.at + op.took for op in self.ops if op.ok and op.at + op.took <= t]
        return max(done) if done else None

    def first_ok_after(self, t: float) -> float | None:
        """When the first command to succeed after ``t`` did (one sent before ``t`` and
        held through the fault counts)."""
        done = [op.at + op.took for op in self.ops if op.ok and op.at + op.took >= t]
        return min(done) if done else None

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two successes (or ``start``/``end``) in [start, end]."""
        done = sorted(op.at + op.took for op in self.ops if op.ok)
        marks = [start, *(x for x in done if start < x < end), end]
        return max(b - a for a, b in itertools.pairwise(marks))

    def errors_after(self, t: float) -> list[str]:
        return [op.error for op in self.ops if op.at + op.took >= t and not op.ok]

    def lost(self, disk: bytes) -> tuple[list[str], list[str]]:
        """The slots whose acknowledged write is not on ``disk``: (durable ones, others).

        A slot may also hold a write that failed after it (the server may have applied it),
        block by block (a failed write may be torn)."""
        durable_lost: list[str] = []
        acked_lost: list[str] = []
        for i, slot in enumerate(self.slots):
            allowed = {slot.acked} | slot.tried
            for off in range(i * SLOT, (i + 1) * SLOT, BLOCK):
                block = disk[off : off + BLOCK]
                found = block[0]
                if block.count(found) == BLOCK and found in allowed:
                    continue
                what = f"slot {i} block {(off - i * SLOT) // BLOCK}: found {found}"
                if found in {slot.durable, *slot.unflushed}:  # an unflushed write went
                    acked_lost.append(f"{what}, acknowledged {slot.acked}")
                else:
                    durable_lost.append(f"{what}, acknowledged durable {slot.durable}")
                break
        return durable_lost, acked_lost
