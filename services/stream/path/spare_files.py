"""Disk files for write-cache mirrors, made before a session's first write needs one.

A ``server-disk`` write cache keeps its mirror (the session's written blocks, read back by
``preadv``) in an unlinked file of this node, made at the session's first change. On ext4
that creation waits for the file system's journal: 0.19-1.14 ms, median 0.55 ms per
session here (timed in the node over one-client boot replays of bench/bootstorm.py's
trace), while the client waited for the write's answer — the largest single part of it.
A few files made ahead, in a worker thread while the node is quiet, take that off the
write's path; when they run out (a storm's first writes), a file is made on the spot, as
before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Files kept ready: the first writes of this many sessions in a row find one.
KEEP = 8
# Spares are made again once no file was taken for this long (a storm's first writes
# have passed): their creation then competes with nobody's request.
QUIET_S = 0.02


def unlinked_file(directory: Path | None) -> int:
    """A new empty file in ``directory`` (None: the temp dir) that has no name: it vanishes
    with its last descriptor, whatever happens to this process."""
    try:
        return os.open(
            directory or tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600
        )
    except OSError as e:
        # File systems without O_TMPFILE (it needs support of the file system).
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, name = tempfile.mkstemp(prefix="wc-", dir=directory)
    os.unlink(name)
    return fd


class SpareFiles:
    """Up to ``keep`` unlinked files in ``directory`` (None: the temp dir), ready to be taken."""

    def __init__(self, directory: Path | None, keep: int = KEEP) -> None:
        self.directory = directory
        self.keep = keep
        self._fds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._making: asyncio.Future[list[int]] | None = None
        self._closed = False

    def take(self) -> int:
        """A spare file, or a new one when none is left; more are made once quiet."""
        fd = self._fds.pop() if self._fds else unlinked_file(self.directory)
        self.make_when_quiet(QUIET_S)
        return fd

    def make_when_quiet(self, delay_s: float = 0.0) -> None:
        """Make the spares up to ``keep`` after ``delay_s`` (pushed back by each take).
        Outside an event loop (a tool, a test building a stack) nothing is made ahead."""
        if self._closed or len(self._fds) >= self.keep:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay_s, self._make)

    def _make(self) -> None:
        self._timer = None
        if self._making is not None and not self._making.done():
            return  # the run under way makes up to ``keep``
        wanted = self.keep - len(self._fds)
        if wanted <= 0 or self._closed:
            return
        # In a thread: a creation that waits for the journal does not hold up the loop.
        self._making = asyncio.get_running_loop().run_in_executor(None, self._create, wanted)
        self._making.add_done_callback(self._made)

    def _create(self, n: int) -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(n):
                fds.append(unlinked_file(self.directory))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _made(self, fut: asyncio.Future[list[int]]) -> None:
        if fut.cancelled():
            return
        if (e := fut.exception()) is not None:
            # The first writes make their own files, and say so if that fails too.
            log.warning("spare write-cache files not made in %s: %s", self.directory, e)
            return
        fds = fut.result()
        if self._closed:
            for fd in fds:
                os.close(fd)
            return
        self._fds.extend(fds)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
