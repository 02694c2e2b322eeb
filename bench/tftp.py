"""TFTP throughput: streamboot's server beside tftpd-hpa (`in.tftpd`) on the same files.

    uv run python bench/tftp.py [--size-mib 32] [--repeat 3]

Both servers run as their own processes on loopback ports; each row is the best of
``--repeat`` downloads of the same file by the same client. Clients: curl (lock-step,
``--tftp-blksize``), tftp-hpa's ``tftp`` (lock-step, 512), atftp (windowsize, RFC 7440)
and the windowed client of ``services.boot.tftp_client`` (tftpd-hpa does not know
windowsize and answers lock-step).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.boot.tftp_client import fetch  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402


def serve(root: str, port: int) -> None:
    """The streamboot server alone in this process (what `--serve` runs)."""
    import uvloop

    from services.boot.tftp_server import TftpConfig, TftpServer

    async def main() -> None:
        server = TftpServer(TftpConfig(root=Path(root)), "127.0.0.1", port)
        await server.start()
        await asyncio.Event().wait()

    uvloop.run(main())


def wait_port(port: int, name: str) -> None:
    """Wait until a TFTP server answers on ``port`` (a request for a missing file)."""
    for _ in range(100):
        try:
            fetch("127.0.0.1", port, "missing-file", timeout_s=0.1, retries=0)
        except Exception as exc:
            if "not found" in str(exc).lower():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start on port {port}")


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def curl(port: int, name: str, blksize: int) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(
            ["curl", "-sf", "--tftp-blksize", str(blksize), "-o", "/dev/null",
             f"tftp://127.0.0.1:{port}/{name}"],
            check=True, timeout=120,
        )  # fmt: skip

    return run


def tftp_hpa(port: int, name: str, _blksize: int) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(
            ["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", name, "/dev/null"],
            check=True, timeout=120, capture_output=True,
        )  # fmt: skip

    return run


def atftp(windowsize: int) -> Callable[[int, str, int], Callable[[], None]]:
    def make(port: int, name: str, blksize: int) -> Callable[[], None]:
        def run() -> None:
            subprocess.run(
                ["atftp", "--option", f"blksize {blksize}", "--option", f"windowsize {windowsize}",
                 "-g", "-r", name, "-l", "/dev/null", "127.0.0.1", str(port)],
                check=True, timeout=120, capture_output=True,
            )  # fmt: skip

        return run

    return make


def own(windowsize: int) -> Callable[[int, str, int], Callable[[], None]]:
    def make(port: int, name: str, blksize: int) -> Callable[[], None]:
        def run() -> None:
            fetch("127.0.0.1", port, name, blksize=blksize, windowsize=windowsize, keep=False)

        return run

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if not shutil.which("in.tftpd"):
        sys.exit("in.tftpd not found: apt-get install tftpd-hpa")
    workdir = Path(tempfile.mkdtemp(prefix="streamboot-bench-tftp-"))
    workdir.chmod(0o755)  # in.tftpd drops to the `tftp` user
    name = "payload.bin"
    (workdir / name).write_bytes(os.urandom(args.size_mib * 1024 * 1024))
    (workdir / name).chmod(0o644)
    ours_port, hpa_port = free_port(), free_port()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--serve", str(workdir), str(ours_port)]),
        subprocess.Popen(
            ["in.tftpd", "-L", "-a", f"127.0.0.1:{hpa_port}", "-s", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_port(ours_port, "streamboot tftp")
        wait_port(hpa_port, "in.tftpd")
        cases = [
            ("curl", curl, 512, 1),
            ("curl", curl, 1468, 1),
            ("curl", curl, 8192, 1),
            ("tftp-hpa", tftp_hpa, 512, 1),
            ("atftp", atftp(1), 1468, 1),
            ("atftp", atftp(16), 512, 16),
            ("atftp", atftp(16), 1468, 16),
            ("atftp", atftp(16), 8192, 16),
            ("streamboot client", own(1), 1468, 1),
            ("streamboot client", own(16), 512, 16),
            ("streamboot client", own(16), 1468, 16),
            ("streamboot client", own(16), 8192, 16),
        ]
        size = (workdir / name).stat().st_size
        print(
            f"file: {size / 2**20:.0f} MiB, best of {args.repeat} interleaved runs, loopback, MB/s = 10^6 B/s"
        )
        header = f"{'client':<18} {'blksize':>7} {'window':>6} {'tftpd-hpa':>10} {'streamboot':>10} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        for label, make, blksize, window in cases:
            # tftpd-hpa has no windowsize: the same client asks, it answers lock-step.
            # Interleaved, best of each: the machine's other load hits both alike.
            hpa_runs, our_runs = [], []
            for _ in range(args.repeat):
                hpa_runs.append(timed(make(hpa_port, name, blksize)))
                our_runs.append(timed(make(ours_port, name, blksize)))
            hpa, ours = min(hpa_runs), min(our_runs)
            print(
                f"{label:<18} {blksize:>7} {window:>6} {size / hpa / 1e6:>10.1f} "
                f"{size / ours / 1e6:>10.1f} {hpa / ours:>5.2f}x"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
