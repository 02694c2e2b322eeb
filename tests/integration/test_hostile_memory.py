"""Memory stays bounded under hostile connections (issue 26, item 4): the stream node (NBD
handshakes never finished) and the boot HTTP server (slowloris), each its own process, are
loaded round after round with as many connections as their total admits
(STREAMBOOT_STREAM_MAX_HANDSHAKES, STREAMBOOT_BOOT_HTTP_MAX_WAITING), never closed by the
client: 12 times the total in all (the 20,000 of bench/hostile.py are 5 times the totals of
its servers). Their resident memory grows over the first rounds (held connections, and what
the allocator keeps of the shed ones) and then stays where it is: the totals shed the oldest
instead of holding more. Without a total it grows round after round (the test fails)."""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamboot.embedded.proc import free_port

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
TOTAL = 512
ROUNDS = 12  # the first half to settle, the second half must not grow it
FD_LIMIT = TOTAL * ROUNDS + 1024  # the servers' own: the totals bound them, not descriptors
SOURCES = [f"127.0.6.{i}" for i in range(1, 9)]
NBD_GREETING = 18  # NBDMAGIC, IHAVEOPT, the handshake flags


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < FD_LIMIT:
        pytest.skip(f"needs {FD_LIMIT} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1])


@contextlib.contextmanager
def process(cmd: list[str], ready: Callable[[subprocess.Popen[str]], None]) -> Iterator[int]:
    """``cmd`` under FD_LIMIT; its pid once ``ready`` returns."""
    proc = subprocess.Popen(
        ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", *cmd], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "STREAMBOOT_STREAM_MAX_HANDSHAKES_PER_ADDRESS": "0",
             "STREAMBOOT_STREAM_MAX_HANDSHAKES": str(TOTAL)},
    )  # fmt: skip
    try:
        ready(proc)
        # What it logs from now on is read and dropped, so that it never blocks on the pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        yield proc.pid  # prlimit execs the command: the same process
    finally:
        proc.kill()
        proc.wait(10)


def until_line(proc: subprocess.Popen[str], starts: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if starts in line:
            return line
    raise AssertionError(f"the server ended before {starts!r}")


@contextlib.contextmanager
def stream_node(tmp: Path) -> Iterator[tuple[int, int, int]]:
    """A standalone stream node: (pid, NBD port, HTTP port)."""
    image = tmp / "base.raw"
    image.write_bytes(os.urandom(1 << 20))
    ports: list[int] = []

    def ready(proc: subprocess.Popen[str]) -> None:
        ports.extend(int(p) for p in until_line(proc, "READY").split()[1:3])

    cmd = [sys.executable, "-m", "services.stream.standalone", "--token", "t", str(image)]
    with process(cmd, ready) as pid:
        yield pid, ports[0], ports[1]


@contextlib.contextmanager
def boot_http() -> Iterator[tuple[int, int]]:
    """The boot HTTP server alone (tests/boot/test_http_limits.py): (pid, port)."""
    port = free_port()
    code = f"from tests.boot.test_http_limits import serve; serve({port}, {TOTAL})"
    with process([sys.executable, "-c", code], lambda p: until_line(p, "boot http on")) as pid:
        yield pid, port


def connect(port: int, n: int, first: bytes, held: list[socket.socket]) -> None:
    """``n`` more connections from SOURCES, each sending ``first`` (maybe nothing)."""
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), 30, (SOURCES[i % len(SOURCES)], 0))
        if first:
            with contextlib.suppress(OSError):  # shed already
                s.sendall(first)
        held.append(s)


def greeted(s: socket.socket) -> None:
    """The NBD server has taken ``s`` (and, accepts being in order, every one before it)."""
    got = b""
    while len(got) < NBD_GREETING:
        chunk = s.recv(NBD_GREETING - len(got))
        assert chunk, "closed before its greeting"
        got += chunk


def answered(port: int) -> None:
    """A request from another address is answered: every connection before it was taken."""
    with socket.create_connection(("127.0.0.1", port), 30) as s:
        s.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 ")


def bounded(pid: int, load: Callable[[int, list[socket.socket]], None]) -> None:
    """ROUNDS x TOTAL connections, held: the server's resident memory grows over the first
    half of the rounds and (nearly) not over the second."""
    held: list[socket.socket] = []
    try:
        time.sleep(0.5)  # settled after its start
        rss, fds = [rss_kib(pid)], []
        for _ in range(ROUNDS):
            load(TOTAL, held)
            rss.append(rss_kib(pid))
            fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    finally:
        for s in held:
            s.close()
    half = ROUNDS // 2
    first, second = rss[half] - rss[0], rss[-1] - rss[half]
    rounds = [b - a for a, b in itertools.pairwise(rss)]
    # Held connections cost something measurable, so that "no more" means something.
    assert first >= 1024, f"{half * TOTAL} connections cost only {first} KiB: {rounds}"
    # Unbounded, the second half would cost about what the first did.
    assert second <= first // 4, (
        f"KiB per round of {TOTAL} connections: {rounds}; descriptors {fds}"
    )


def test_stream_node_half_finished_nbd_handshakes(tmp_path: Path) -> None:
    with stream_node(tmp_path) as (pid, nbd_port, _):

        def load(n: int, held: list[socket.socket]) -> None:
            connect(nbd_port, n, b"", held)
            greeted(held[-1])

        bounded(pid, load)


def test_boot_http_slowloris() -> None:
    with boot_http() as (pid, port):

        def load(n: int, held: list[socket.socket]) -> None:
            connect(port, n, b"GET / HTTP/1.1\r\n", held)
            answered(port)

        bounded(pid, load)
