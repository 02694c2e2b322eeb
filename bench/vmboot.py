"""VM boot benchmark: a QEMU VM (TCG) boots the demo vdisk to its marker line, from the local
file and over NBD from streamboot, nbdkit (file plugin) and qemu-nbd, in one run.

Each server gets the same read-only image and its own copy-on-write layer (streamboot: the
session's write cache; nbdkit: the cow filter; qemu-nbd: --snapshot), as a diskless client
would use it. Reports mean and standard deviation of the time to the marker over --runs.

    uv run python bench/vmboot.py [--runs 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import wait_port  # noqa: E402
from services.stream.settings import StreamSettings  # noqa: E402
from services.stream.spec import ExportSpec  # noqa: E402
from streamboot.demo.image import build_demo_image, recipe_digest  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402
from tests.stream.conftest import ServerThread  # noqa: E402
from tests.vm.vm import boot_vm  # noqa: E402


@contextmanager
def local(image: Path, work: Path) -> Iterator[str]:
    copy = work / "local.img"
    shutil.copyfile(image, copy)
    yield str(copy)


@contextmanager
def streamboot(image: Path, work: Path) -> Iterator[str]:
    spec = ExportSpec("bench", "demo", 1, (image,), image.stat().st_size, "server-ram")
    server = ServerThread(
        {"bench": spec}, StreamSettings(nbd_port=0, http_port=0, session_linger_s=0)
    )
    server.start()
    try:
        yield f"{server.nbd}/bench"
    finally:
        server.stop()


@contextmanager
def process(argv: list[str], port: int, uri: str) -> Iterator[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield uri
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def nbdkit(image: Path, work: Path) -> Iterator[str]:
    port = free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=cow", "file", str(image)]
    with process(argv, port, f"nbd://127.0.0.1:{port}") as uri:
        yield uri


@contextmanager
def qemu_nbd(image: Path, work: Path) -> Iterator[str]:
    port = free_port()
    argv = ["qemu-nbd", "-b", "127.0.0.1", "-p", str(port), "-f", "raw", "--snapshot",
            "-t", "-x", "bench", str(image)]  # fmt: skip
    with process(argv, port, f"nbd://127.0.0.1:{port}/bench") as uri:
        yield uri


SOURCES: dict[str, Callable[[Path, Path], object]] = {
    "local file": local,
    "streamboot NBD": streamboot,
    "nbdkit (cow)": nbdkit,
    "qemu-nbd (snapshot)": qemu_nbd,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--image", type=Path, help="a demo image (default: build one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamboot-vmboot-"))
    try:
        image = args.image
        if image is None:
            cache = Path(
                os.environ.get("STREAMBOOT_TEST_CACHE", Path.home() / ".cache" / "streamboot-test")
            )
            image = cache / f"demo-{recipe_digest()}.img"
            if not image.exists():
                build_demo_image(image, cache_dir=cache / "kernel")
        times: dict[str, list[float]] = {name: [] for name in SOURCES}
        # Interleave the sources so that machine noise spreads over all of them.
        for run in range(args.runs):
            for name, source in SOURCES.items():
                with source(image, work) as drive:  # type: ignore[attr-defined]
                    result = boot_vm(drive)
                if "streamboot-client: BOOTED" not in result.console:
                    raise SystemExit(f"{name}: run {run} did not boot:\n{result.console[-2000:]}")
                times[name].append(result.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.mean(times["local file"])
    print(f"\nQEMU TCG boot of the demo vdisk to its marker, {args.runs} runs each\n")
    print(f"| {'disk':<20} | mean s | stdev s | vs local |")
    print(f"|{'-' * 22}|--------|---------|----------|")
    for name, values in times.items():
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name:<20} | {mean:6.2f} | {sd:7.2f} | {mean / base:7.2f}x |")


if __name__ == "__main__":
    main()
