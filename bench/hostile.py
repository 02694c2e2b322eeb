"""A good client's latency while hostile clients load the server (issue #26, item 4).

    uv run python bench/hostile.py [--connections 1000] [--tries 7]

One run, one small raw image, served at the same time by the stream server
(``services.stream.standalone``) and nbdkit's file plugin. Per load, the good client's
latency (median and worst of ``--tries``) is measured against both where the load applies:

- ``none``: no load;
- ``nbd-handshakes``: ``--connections`` sockets that read the greeting and never answer it
  (from 127.0.0.2, the good client connects from 127.0.0.1);
- ``http-slowloris``: as many sockets on the stream's HTTP server, each sending its request
  head one byte every second (never finished).

The good clients are real ones: ``nbdinfo --size`` (connect, handshake, the size) and
``curl -r 0-4095`` of the HTTP export. Bounded: every load lasts only its measurements,
every socket is closed after it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.nbd import free_port, server  # noqa: E402

TOKEN = "hostile-token"
ATTACKER = "127.0.0.2"


# A good client not served within this counts as refused (shown as a timeout).
CLIENT_TIMEOUT_S = 10.0


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=CLIENT_TIMEOUT_S)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
        return float("inf")
    return time.perf_counter() - t


@contextlib.contextmanager
def half_open(port: int, n: int, trickle: bytes = b"") -> Iterator[None]:
    """``n`` connections from ATTACKER that never finish; with ``trickle``, each sends
    its next byte every second."""
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), 10, (ATTACKER, 0))
            s.setblocking(False)
            socks.append(s)

        def drip() -> None:
            i = 0
            while not stop.wait(1.0):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(trickle[i % len(trickle) : i % len(trickle) + 1])
                i += 1

        if trickle:
            threading.Thread(target=drip, daemon=True).start()
        time.sleep(1.0)  # the server has accepted them all
        yield
    finally:
        stop.set()
        for s in socks:
            s.close()


def ms(s: float) -> str:
    return f"{s * 1000:.0f}" if s != float("inf") else f"not served in {CLIENT_TIMEOUT_S:.0f} s"


def measure(fn: Callable[[], float], tries: int) -> tuple[float, float]:
    got = [fn() for _ in range(tries)]
    return statistics.median(got), max(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--tries", type=int, default=7)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections * 2 + 256), hard))
    rows: list[tuple[str, str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        image = Path(tmp) / "image.raw"
        image.write_bytes(os.urandom(16 << 20))
        p = {name: free_port() for name in ("nbd", "http", "nbdkit")}
        stream = [sys.executable, "-m", "services.stream.standalone", "--token", TOKEN,
                  "--nbd-port", str(p["nbd"]), "--http-port", str(p["http"]), str(image)]  # fmt: skip
        nbdkit = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(p["nbdkit"]), "file", str(image)]
        os.chdir(ROOT)
        nbd_clients = {
            "stream": ["nbdinfo", "--size", f"nbd://127.0.0.1:{p['nbd']}/{TOKEN}"],
            "nbdkit": ["nbdinfo", "--size", f"nbd://127.0.0.1:{p['nbdkit']}/"],
        }
        curl = ["curl", "-sf", "-o", "/dev/null", "-r", "0-4095",
                f"http://127.0.0.1:{p['http']}/s/{TOKEN}"]  # fmt: skip
        with server(stream, p["nbd"]), server(nbdkit, p["nbdkit"]):
            for name, cmd in nbd_clients.items():
                rows.append(("none", name, "nbdinfo", *measure(lambda c=cmd: timed(c), args.tries)))
            rows.append(("none", "stream", "curl", *measure(lambda: timed(curl), args.tries)))
            for name, cmd in nbd_clients.items():
                port = p["nbd"] if name == "stream" else p["nbdkit"]
                with half_open(port, args.connections):
                    rows.append(("nbd-handshakes", name, "nbdinfo",
                                 *measure(lambda c=cmd: timed(c), args.tries)))  # fmt: skip
            head = f"GET /s/{TOKEN} HTTP/1.1\r\nHost: x\r\n" + "X-Pad: y\r\n" * 50
            with half_open(p["http"], args.connections, head.encode()):
                rows.append(("http-slowloris", "stream", "curl",
                             *measure(lambda: timed(curl), args.tries)))  # fmt: skip
                # The NBD side of the same node meanwhile.
                rows.append(("http-slowloris", "stream", "nbdinfo",
                             *measure(lambda: timed(nbd_clients["stream"]), args.tries)))  # fmt: skip

    print(f"\nGood client under hostile load: {args.connections} connections, "
          f"{args.tries} tries each, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| load | server | good client | median ms | worst ms |")
    print("|---|---|---|---|---|")
    for load, name, client, med, worst in rows:
        print(f"| {load} | {name} | {client} | {ms(med)} | {ms(worst)} |")


if __name__ == "__main__":
    main()
