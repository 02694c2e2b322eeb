"""Benchmark the stream NBD server side by side with nbdkit (file plugin) and qemu-nbd.

    uv run python bench/nbd.py [--size-gib 1] [--runtime 5] [--rounds 3]

One run, one raw image (filled with random data, not sparse) in a temp dir, served at the
same time by: the stream server (``stream``: its own socket transport, large reads by
sendfile; ``stream-uv``: the same on uvloop's transports), nbdkit's file plugin and
qemu-nbd, all on loopback. The same fio jobs (fio's ``nbd`` engine, i.e. libnbd) run against
each: sequential read 1 MiB x 8 in flight, 4 KiB random read at 16 and at 1 in flight, 4 KiB
random write at 16 in flight (writes go last: nbdkit and qemu-nbd write into the image, the
stream server into its session's write cache). The page cache is warmed first, so the
comparison is of the servers, not the disk. Per workload the servers run back to back, for
``--rounds`` rounds, best kept: background load on a shared machine then hits all alike.
Prints MiB/s, IOPS and the ratio to nbdkit.

With ``--tls`` (what NBD over TLS costs): the stream server plain and with
``NBD_OPT_STARTTLS`` required (``stream-tls``, services/stream/nbd/tls.py) beside nbdkit plain
and with ``--tls=require`` (``nbdkit-tls``), the same certificates (a CA and a server
certificate made by the stream node's own code), the read workloads only; a TLS row's ratio
is to nbdkit-tls. Then pre-shared keys too (``stream-psk``, ``nbdkit-psk``: one psktool-format
key file): fio's nbd engine may not read a key file named in a URI, so these four TLS
servers are read whole by ``nbdcopy`` (libnbd too) to ``null:`` in 4 KiB requests 16 at a
time and in 1 MiB requests 8 at a time; a row's ratio is to nbdkit with the same credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"

WORKLOADS = [
    ("seq read 1M qd8", dict(rw="read", bs="1M", iodepth=8)),
    ("rand read 4K qd16", dict(rw="randread", bs="4k", iodepth=16)),
    ("rand read 4K qd1", dict(rw="randread", bs="4k", iodepth=1)),
    ("rand write 4K qd16", dict(rw="randwrite", bs="4k", iodepth=16)),
]


READS = WORKLOADS[:3]


def tls_servers(
    plain: dict[str, tuple[list[str], str]],
    ports: dict[str, int],
    stream: list[str],
    image: Path,
    tmp: Path,
) -> dict[str, tuple[list[str], str]]:
    """stream and nbdkit, each plain and requiring TLS, on the same credentials."""
    sys.path.insert(0, str(ROOT))
    from services.stream.nbd.tls import default_credentials

    creds = tmp / "tls"
    default_credentials(creds, ["127.0.0.1"])
    ports.update({"stream-tls": free_port(), "nbdkit-tls": free_port()})
    trust_for_fio(creds, tmp / "home")
    return {
        "stream": plain["stream"],
        "stream-tls": (
            [*stream, "--nbd-port", str(ports["stream-tls"]), "--tls-dir", str(creds)],
            f"nbds://127.0.0.1:{ports['stream-tls']}/{TOKEN}",
        ),
        "nbdkit": plain["nbdkit"],
        "nbdkit-tls": (
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(ports["nbdkit-tls"]), "--tls=require",
             f"--tls-certificates={creds}", "file", str(image)],
            f"nbds://127.0.0.1:{ports['nbdkit-tls']}/",
        ),
    }  # fmt: skip


# nbdcopy's workloads of the TLS servers: (label, request size, requests in flight).
COPIES = [("copy 4K x16", 4096, 16), ("copy 1M x8", 1 << 20, 8)]
PSK_USER = "bench"


def psk_servers(
    tls: dict[str, tuple[list[str], str]], ports: dict[str, int], image: Path, tmp: Path
) -> dict[str, tuple[list[str], str]]:
    """The TLS servers plus stream and nbdkit on a pre-shared key, each with an nbdcopy
    URI (local files allowed there: the certificates' folder, the key file)."""
    keys = tmp / "keys.psk"
    keys.write_text(f"{PSK_USER}:{os.urandom(32).hex()}\n")
    ports.update({"stream-psk": free_port(), "nbdkit-psk": free_port()})
    creds = tmp / "tls"
    stream_tls = tls["stream-tls"][0]
    return {
        "stream-tls": (stream_tls, f"{tls['stream-tls'][1]}?tls-certificates={creds}"),
        "nbdkit-tls": (tls["nbdkit-tls"][0], f"{tls['nbdkit-tls'][1]}?tls-certificates={creds}"),
        "stream-psk": (
            [*stream_tls[: stream_tls.index("--nbd-port")], "--nbd-port",
             str(ports["stream-psk"]), "--tls-dir", str(creds), "--tls-psk-file", str(keys)],
            f"nbds://{PSK_USER}@127.0.0.1:{ports['stream-psk']}/{TOKEN}?tls-psk-file={keys}",
        ),
        "nbdkit-psk": (
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(ports["nbdkit-psk"]), "--tls=require",
             f"--tls-psk={keys}", "file", str(image)],
            f"nbds://{PSK_USER}@127.0.0.1:{ports['nbdkit-psk']}/?tls-psk-file={keys}",
        ),
    }  # fmt: skip


def nbdcopy(uri: str, size: int, request: int, requests: int) -> tuple[float, float]:
    """The whole disk read to nothing: (MiB/s, requests/s)."""
    start = time.monotonic()
    subprocess.run(
        ["nbdcopy", f"--request-size={request}", f"--requests={requests}", "--connections=1",
         uri, "null:"],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    took = time.monotonic() - start
    return size / took / (1 << 20), size / request / took


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_image(path: Path, size: int) -> None:
    chunk = 4 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm cache


@contextlib.contextmanager
def server(cmd: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# fio's nbd engine may not read local files named in a URI (``tls-certificates=``): libnbd
# then trusts $HOME/.pki/libnbd (/etc/pki/libnbd for root, so root runs it as nobody).
FIO: list[str] = ["fio"]


def trust_for_fio(creds: Path, home: Path) -> None:
    pki = home / ".pki" / "libnbd"
    pki.mkdir(parents=True)
    shutil.copy(creds / "ca-cert.pem", pki / "ca-cert.pem")
    FIO[:] = ["env", f"HOME={home}", "fio"]
    if os.geteuid() == 0:
        home.parent.chmod(0o711)  # the bench's temp dir: nobody may pass through
        for d in (home, home / ".pki", pki):
            d.chmod(0o755)
        FIO[:0] = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def fio(uri: str, runtime: int, rw: str, bs: str, iodepth: int) -> tuple[float, float]:
    out = subprocess.run(
        [*FIO, "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={iodepth}", f"--runtime={runtime}", "--time_based", "--ramp_time=1",
         "--randrepeat=0", "--output-format=json"],
        capture_output=True, text=True, timeout=runtime * 4 + 60, check=True,
    )  # fmt: skip
    # fio's nbd engine prints a line of its own before the JSON.
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return side["bw_bytes"] / (1 << 20), side["iops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and job (best kept)")
    ap.add_argument("--write-cache", default="server-ram", choices=["server-ram", "server-disk"])
    ap.add_argument("--tls", action="store_true", help="plain against TLS, with nbdkit's")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install fio nbdkit qemu-utils)")

    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp:
        image = Path(tmp) / "image.raw"
        make_image(image, int(args.size_gib * (1 << 30)))
        ports = {name: free_port() for name in ("stream", "stream-uv", "nbdkit", "qemu-nbd")}
        stream = [
            sys.executable,
            "-m",
            "services.stream.standalone",
            "--token",
            TOKEN,
            "--write-cache",
            args.write_cache,
            str(image),
        ]
        servers = {
            # Default: own socket transport, large reads by sendfile.
            "stream": (
                [*stream, "--nbd-port", str(ports["stream"])],
                f"nbd://127.0.0.1:{ports['stream']}/{TOKEN}",
            ),
            # The same server on uvloop's transports (every reply copied through Python).
            "stream-uv": (
                [*stream, "--nbd-port", str(ports["stream-uv"]), "--no-zero-copy"],
                f"nbd://127.0.0.1:{ports['stream-uv']}/{TOKEN}",
            ),
            "nbdkit": (
                ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(ports["nbdkit"]), "file",
                 str(image)],
                f"nbd://127.0.0.1:{ports['nbdkit']}/",
            ),
            "qemu-nbd": (
                ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(ports["qemu-nbd"]),
                 "-x", "img", "--persistent", "--shared=16", str(image)],
                f"nbd://127.0.0.1:{ports['qemu-nbd']}/img",
            ),
        }  # fmt: skip
        workloads = WORKLOADS
        if args.tls:
            servers, workloads = tls_servers(servers, ports, stream, image, Path(tmp)), READS
        results: dict[tuple[str, str], tuple[float, float]] = {}
        os.chdir(ROOT)  # so `-m services.stream.standalone` resolves
        with contextlib.ExitStack() as stack:
            for name, (cmd, _) in servers.items():
                stack.enter_context(server(cmd, ports[name]))
            # Workload by workload, the servers back to back and in rounds (best of them):
            # the machine's background load then hits every server alike.
            for label, job in workloads:
                for _ in range(args.rounds):
                    for name, (_, uri) in servers.items():
                        got = fio(uri, args.runtime, **job)  # type: ignore[arg-type]
                        best = results.get((label, name), (0.0, 0.0))
                        results[(label, name)] = max(best, got)
                        print(f"  {label:20} {name:9} {got[0]:9.1f} MiB/s",
                              file=sys.stderr, flush=True)  # fmt: skip

        copies: dict[tuple[str, str], tuple[float, float]] = {}
        if args.tls:
            tls_only = {k: v for k, v in servers.items() if k.endswith("-tls")}
            psk = psk_servers(tls_only, ports, image, Path(tmp))
            disk = image.stat().st_size
            with contextlib.ExitStack() as stack:
                for name, (cmd, _) in psk.items():
                    stack.enter_context(server(cmd, ports[name]))
                for label, request, requests in COPIES:
                    for _ in range(args.rounds):
                        for name, (_, uri) in psk.items():
                            got = nbdcopy(uri, disk, request, requests)
                            copies[(label, name)] = max(copies.get((label, name), (0, 0)), got)
                            print(f"  {label:20} {name:10} {got[0]:9.1f} MiB/s",
                                  file=sys.stderr, flush=True)  # fmt: skip

    size = f"{args.size_gib:g} GiB"
    print(f"\nNBD benchmark: {size} raw image, fio nbd engine, best of {args.rounds} x "
          f"{args.runtime}s per job, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}, "
          f"stream write cache {args.write_cache}\n")  # fmt: skip
    print(f"| {'workload':20} | {'server':10} | {'MiB/s':>9} | {'IOPS':>9} | {'vs nbdkit':>9} |")
    print(f"|{'-' * 22}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for label, _ in workloads:
        for name in servers:
            ref = results[(label, "nbdkit-tls" if name.endswith("-tls") else "nbdkit")][0]
            mib, iops = results[(label, name)]
            print(f"| {label:20} | {name:10} | {mib:9.1f} | {iops:9.0f} | {mib / ref:8.2f}x |")
    if copies:
        print(f"\nTLS by credentials: nbdcopy of the whole disk to null:, best of {args.rounds}\n")
        print(
            f"| {'workload':20} | {'server':10} | {'MiB/s':>9} | {'IOPS':>9} | {'vs nbdkit':>9} |"
        )
        print(f"|{'-' * 22}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
        for (label, name), (mib, iops) in copies.items():
            ref = copies[(label, "nbdkit-" + name.split("-")[1])][0]
            print(f"| {label:20} | {name:10} | {mib:9.1f} | {iops:9.0f} | {mib / ref:8.2f}x |")


if __name__ == "__main__":
    main()
