"""Benchmark the stream node's iSCSI target side by side with tgt (the Linux SCSI target
framework's userspace daemon) on the same image.

    uv run python bench/iscsi.py [--size-mib 512] [--runtime 5] [--rounds 3]

One raw image (random data, not sparse) in a temp dir, served at the same time by the
stream server (``services.stream.standalone``, target ``iqn.2026-12.io.streamboot:<token>``
LUN 0) and by tgtd (its file backing store, LUN 1), both on loopback. libiscsi's
``iscsi-perf`` reads from each: sequential 1 MiB x 8 in flight, 4 KiB random at 16 and at 1
in flight (iscsi-perf only reads). The page cache is warmed first, so the comparison is of
the targets, not the disk. Per workload the targets run back to back for ``--rounds``
rounds, best kept. Needs root (tgtd) and Debian's ``libiscsi-bin`` and ``tgt``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import wait_port  # noqa: E402
from tests.stream.tgt import free_port, tgt_target  # noqa: E402

TOKEN = "bench-token"

# name, iscsi-perf arguments
WORKLOADS = [
    ("seq read 1M qd8", ["-m", "8", "-b", "2048"]),
    ("rand read 4K qd16", ["-m", "16", "-b", "8", "-r"]),
    ("rand read 4K qd1", ["-m", "1", "-b", "8", "-r"]),
]
RESULT = re.compile(r"iops average (\d+) \((\d+) MB/s\)\s*$", re.M)


def make_image(path: Path, size: int) -> None:
    chunk = 4 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))


@contextlib.contextmanager
def streamboot(image: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "services.stream.standalone", "--token", TOKEN,
           "--iscsi-port", str(port), str(image)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"iscsi://127.0.0.1:{port}/iqn.2026-12.io.streamboot:{TOKEN}/0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def perf(url: str, args: list[str], runtime: int) -> tuple[int, int]:
    """(IOPS, MB/s) averaged over the run."""
    out = subprocess.run(
        ["iscsi-perf", "-t", str(runtime), *args, url],
        capture_output=True, text=True, errors="replace", timeout=runtime + 60,
    )  # fmt: skip
    found = RESULT.findall(out.stdout.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"iscsi-perf gave no result:\n{out.stdout[-500:]}\n{out.stderr}")
    iops, mbs = found[-1]
    return int(iops), int(mbs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for tool in ("iscsi-perf", "tgtd", "tgtadm"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install libiscsi-bin tgt)")
    if os.geteuid() != 0:
        sys.exit("tgtd needs root")
    with tempfile.TemporaryDirectory(prefix="bench-iscsi-") as tmp:
        image = Path(tmp) / "image.raw"
        make_image(image, args.size_mib << 20)
        with open(image, "rb") as f:  # warm the page cache
            while f.read(8 << 20):
                pass
        with streamboot(image) as ours, tgt_target(image) as theirs:
            targets = {"streamboot": ours, "tgt": theirs}
            print(f"{'workload':20} {'target':10} {'IOPS':>8} {'MB/s':>8} {'vs tgt':>7}")
            for name, wargs in WORKLOADS:
                best: dict[str, tuple[int, int]] = {}
                for _ in range(args.rounds):
                    for t, url in targets.items():
                        got = perf(url, wargs, args.runtime)
                        best[t] = max(best.get(t, (0, 0)), got)
                for t in targets:
                    iops, mbs = best[t]
                    ratio = iops / best["tgt"][0] if best["tgt"][0] else 0.0
                    print(f"{name:20} {t:10} {iops:8d} {mbs:8d} {ratio:7.2f}")


if __name__ == "__main__":
    main()
