"""Session opens per second: through NATS (what the boot service asks) and the REST API.

    uv run python bench/session_opens.py [--opens 2000] [--concurrency 1,10,100] [--procs 4]
                                         [--profile] [--json rows.json]

A real registry process on an embedded NATS and an embedded PostgreSQL (fsync on, as
`streamboot up` runs them), one vdisk imported with the CLI, ``--opens`` known devices
per row (registered in one batch of events, in a collection the vdisk is assigned to) and
one live stream node's heartbeat (so every open is placed and announced). Each row opens
one session per device, ``C`` at a time, the openers spread over ``--procs`` processes
(at most C), each with its own event loop and its own NATS or HTTP client: one Python
process of httpx spends more CPU per open than the registry does, so a single opener
process, not the server, would set the rate. Reported per row: opens/s (completed opens
only, from the agreed start to the last process's end), the opens' latency p50/p99,
errors, the "busy, retry" answers (back-pressure: the opener waits the delay it is given
and asks again, as a booting client does; the wait counts in its latency), and the CPU
milliseconds per open of the registry, PostgreSQL, nats-server and the opener processes
together (where the time goes). ``--profile`` samples the registry with py-spy during
the rows (``py-spy`` on PATH, else ``uvx py-spy``) and prints where its CPU went: the
functions on CPU (self) and the registry's own functions (inclusive).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import cpu_ms, wait_port  # noqa: E402
from services.registry.domain import devices  # noqa: E402
from services.registry.projection import Projection  # noqa: E402
from shared import bus  # noqa: E402
from shared.event_store import EventStore  # noqa: E402
from shared.events import envelope  # noqa: E402
from shared.heartbeat import Heartbeat  # noqa: E402
from shared.settings import RUNTIME_FILE, Settings  # noqa: E402
from streamboot.block_replay import percentile  # noqa: E402
from streamboot.embedded.nats import EmbeddedNats  # noqa: E402
from streamboot.embedded.postgres import EmbeddedPostgres  # noqa: E402
from streamboot.embedded.proc import free_port  # noqa: E402

TOKEN = "bench-token-" + "x" * 24


class Busy(Exception):
    """The registry answered "busy, retry" (back-pressure): ask again after this delay."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"busy, retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


def mac_of(i: int) -> str:
    return "52:54:02:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


class Rig:
    """NATS, PostgreSQL and the registry (a child process), under ``work``."""

    def __init__(self, work: Path, nats_host: str = "127.0.0.1") -> None:
        self.work = work
        self.nats = EmbeddedNats(work / "nats", port=free_port(), host=nats_host)
        self.pg = EmbeddedPostgres(
            work, port=free_port(), password=secrets.token_urlsafe(16),
            user=Settings().postgres_user,
        )  # fmt: skip
        self.api_port = free_port()
        self.registry: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        await self.nats.start(log_path=self.work / "nats.log")
        await self.pg.start(log_path=self.work / "postgres.log")
        self.database_url = self.pg.dsn()
        data = self.work / "data"
        data.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")} | {
            "STREAMBOOT_DATA_DIR": str(data),
            "STREAMBOOT_NATS_URL": self.nats.url,
            "STREAMBOOT_DATABASE_URL": self.database_url,
            "STREAMBOOT_API_PORT": str(self.api_port),
            "STREAMBOOT_API_TOKEN": TOKEN,
            "STREAMBOOT_NODE_ID": "bench-registry",
            "STREAMBOOT_LOG_LEVEL": "WARNING",
        }
        self.registry = await asyncio.to_thread(self._spawn_registry, env)
        wait_port(self.api_port, 60)
        (data / RUNTIME_FILE).write_text(
            json.dumps({"api_url": self.api_url, "nats_url": self.nats.url})
        )
        self.data = data
        self.env = env

    def _spawn_registry(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.work / "registry.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "services.registry"], env=env, cwd=ROOT, stderr=log
            )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def pids(self) -> dict[str, list[int]]:
        assert self.registry is not None and self.nats.process is not None
        pg = subprocess.run(["pgrep", "-f", str(self.pg.pgdata)], capture_output=True)
        pg_pids = [int(p) for p in pg.stdout.split()]
        # Backends are children of the postmaster: count them all.
        kids = []
        for p in pg_pids:
            r = subprocess.run(["pgrep", "-P", str(p)], capture_output=True)
            kids += [int(k) for k in r.stdout.split()]
        return {
            "registry": [self.registry.pid],
            "postgres": pg_pids + kids,
            "nats": [self.nats.process.pid],
        }

    async def stop(self) -> None:
        if self.registry is not None and self.registry.poll() is None:
            self.registry.send_signal(signal.SIGTERM)
            try:
                self.registry.wait(30)
            except subprocess.TimeoutExpired:
                self.registry.kill()
        await self.pg.stop()
        await self.nats.stop()


def import_vdisk(rig: Rig) -> None:
    image = rig.work / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(
        [sys.executable, "-c", "from streamboot.cli import main; main()", "vdisk", "import",
         str(image), "--name", "bench", "--data-dir", str(rig.data)],
        env=rig.env, check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip


async def seed(rig: Rig, macs: list[str]) -> None:
    """One vdisk (the CLI), the devices (one batch of events), the collection's assignment."""
    await asyncio.to_thread(import_vdisk, rig)
    store = await EventStore.connect(rig.database_url)
    try:
        p = Projection()
        events = [e for m in macs for e in devices.register(p, m, collection="lab")]
        for start in range(0, len(events), 5000):
            await store.append([envelope(e) for e in events[start : start + 5000]])
    finally:
        await store.close()
    async with httpx.AsyncClient(
        base_url=rig.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as http:
        r = await http.post(
            "/assignments",
            json={"target_kind": "collection", "target": "lab", "vdisk": "bench", "default": True},
        )
        r.raise_for_status()
        for _ in range(600):  # the registry's follower has the devices
            if (await http.get(f"/devices/{macs[-1]}")).status_code == 200:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("the registry did not see the devices")


async def open_all(
    open_one: Callable[[str], Awaitable[Any]], macs: list[str], concurrency: int
) -> tuple[list[float], list[str], int]:
    """Open a session per MAC, ``concurrency`` at a time: the latencies of the completed
    (2xx) opens, the errors, and how many "busy, retry" answers came back."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    busy = 0

    async def one(mac: str) -> None:
        nonlocal busy
        async with gate:
            t0 = time.perf_counter()
            while True:
                try:
                    await open_one(mac)
                    latencies.append(time.perf_counter() - t0)
                    return
                except Busy as exc:  # back-pressure: asked again after the delay, as
                    busy += 1  # the boot service's clients do (the wait is in the latency)
                    await asyncio.sleep(exc.retry_after_s)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return

    await asyncio.gather(*(one(m) for m in macs))
    return latencies, errors, busy


async def _open_slice(
    transport: str, nats_url: str, api_url: str, macs: list[str], concurrency: int, start_at: float
) -> tuple[list[float], list[str], int, float, float]:
    """One opener process's share of a row: connected before ``start_at`` (epoch), then
    its opens; also its own CPU seconds from the start and its end time (epoch)."""
    nc = await bus.connect(nats_url, "bench-opens")
    http = httpx.AsyncClient(
        base_url=api_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
        limits=httpx.Limits(max_connections=concurrency),
    )

    async def over_nats(mac: str) -> Any:
        try:
            return await bus.request_json(
                nc, "streamboot.registry.session.open", {"mac": mac}, timeout_s=60
            )
        except bus.RemoteError as exc:
            if exc.kind == "busy":
                raise Busy(exc.detail["retry_after_s"]) from exc
            raise

    async def over_rest(mac: str) -> Any:
        r = await http.post("/sessions", json={"mac": mac})
        if r.status_code == 503 and "retry-after" in r.headers:
            raise Busy(int(r.headers["retry-after"]))
        if r.status_code != 201:
            raise RuntimeError(f"{r.status_code} {r.text[:200]}")
        return r.json()

    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = time.process_time()
        opener = over_nats if transport == "nats" else over_rest
        latencies, errors, busy = await open_all(opener, macs, concurrency)
        return latencies, errors, busy, time.process_time() - cpu0, time.time()
    finally:
        await http.aclose()
        await nc.close()


def open_slice(*args: Any) -> tuple[list[float], list[str], int, float, float]:
    import uvloop

    return uvloop.run(_open_slice(*args))


# How long before the agreed start the slices are handed out: each opener process
# connects to NATS and builds its HTTP client before the row's clock starts.
START_MARGIN_S = 1.0


async def run_row(
    rig: Rig, pool: ProcessPoolExecutor, transport: str, macs: list[str], concurrency: int
) -> dict[str, Any]:
    """A row: ``concurrency`` openers spread over up to the pool's processes, each with
    its own event loop and client; the rate counts completed opens from the agreed start
    to the last process's end."""
    procs = min(pool._max_workers, concurrency)  # type: ignore[attr-defined]
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    pids = rig.pids()
    cpu0 = {k: cpu_ms(v) for k, v in pids.items()}
    start_at = time.time() + START_MARGIN_S
    loop = asyncio.get_running_loop()
    done = await asyncio.gather(*(
        loop.run_in_executor(pool, open_slice, transport, rig.nats.url, rig.api_url,
                             macs[i::procs], shares[i], start_at)
        for i in range(procs)
    ))  # fmt: skip
    wall = max(end for *_, end in done) - start_at
    cpu = {k: (cpu_ms(v) - cpu0[k]) / len(macs) for k, v in pids.items()}
    latencies = [x for lat, *_ in done for x in lat]
    errors = [e for _, errs, *_ in done for e in errs]
    return {
        "opens_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1000 if latencies else 0,
        "p99_ms": percentile(latencies, 99) * 1000 if latencies else 0,
        "errors": len(errors),
        "busy": sum(d[2] for d in done),
        "first_error": errors[0] if errors else "",
        "procs": procs,
        **{f"{k}_cpu_ms": v for k, v in cpu.items()},
        # The opener processes' own CPU (their clients: httpx or nats-py).
        "client_cpu_ms": sum(d[3] for d in done) * 1000 / len(macs),
    }


async def main_async(args: argparse.Namespace, work: Path) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    transports = args.transports.split(",")
    rows = len(concurrencies) * len(transports)
    macs = [mac_of(i) for i in range(args.opens * rows)]
    rig = Rig(work)
    try:
        await rig.start()
        await seed(rig, macs)
        nc = await bus.connect(rig.nats.url, "bench-opens")
        node = Heartbeat(nc.jetstream(), "stream", "bench-node", 2.0, lambda: {
            "load": 0, "nbd": "127.0.0.1:1", "http_stream": "http://127.0.0.1:2"})  # fmt: skip
        beating = asyncio.create_task(node.run())
        await asyncio.sleep(1.0)
        pool = ProcessPoolExecutor(args.procs, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(abs, range(args.procs)))  # the processes up before the first row
        print(
            f"{args.opens} opens per row, openers over up to {args.procs} processes; "
            "CPU ms per open by process"
        )
        print(
            f"{'via':5} {'C':>4} {'opens/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'busy':>5} "
            f"{'registry':>8} {'postgres':>8} {'nats':>6} {'client':>6}"
        )
        spy = start_py_spy(rig, work / "registry.folded") if args.profile else None
        rows_out: list[dict[str, Any]] = []
        n = 0
        for transport in transports:
            for c in concurrencies:
                batch = macs[n * args.opens : (n + 1) * args.opens]
                n += 1
                r = await run_row(rig, pool, transport, batch, c)
                rows_out.append({"via": transport, "concurrency": c, **r})
                print(
                    f"{transport:5} {c:>4} {r['opens_s']:>8.0f} {r['p50_ms']:>7.1f} "
                    f"{r['p99_ms']:>7.1f} {r['errors']:>6} {r['busy']:>5} {r['registry_cpu_ms']:>8.2f} "
                    f"{r['postgres_cpu_ms']:>8.2f} {r['nats_cpu_ms']:>6.2f} "
                    f"{r['client_cpu_ms']:>6.2f}",
                    flush=True,
                )
                if r["errors"]:
                    print(f"      first error: {r['first_error']}")
        if args.json:
            args.json.write_text(json.dumps(rows_out, indent=1))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            await asyncio.to_thread(spy.wait, 60)
            print_profile(work / "registry.folded")
        beating.cancel()
        pool.shutdown()
        await nc.close()
    finally:
        await rig.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def start_py_spy(rig: Rig, out: Path) -> subprocess.Popen[bytes]:
    assert rig.registry is not None
    spy = shutil.which("py-spy")
    argv = [spy] if spy else ["uvx", "py-spy"]
    return subprocess.Popen(
        [*argv, "record", "--format", "raw", "--rate", "250", "--nonblocking",
         "--pid", str(rig.registry.pid), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def print_profile(folded: Path, top: int = 25) -> None:
    """From py-spy's collapsed stacks: the share of samples per function on CPU, and per
    function of the registry's own code anywhere on the stack."""
    own: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for f in set(frames):
            if "services/" in f or "shared/" in f:
                own[f] += n
    for title, counts in (("on CPU (self)", leaf), ("registry code (inclusive)", own)):
        print(f"\nregistry, {total} samples: {title}")
        for f, n in counts.most_common(top):
            print(f"{100 * n / max(total, 1):6.1f}%  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opens", type=int, default=2000, help="opens per row")
    ap.add_argument("--concurrency", default="1,10,100")
    ap.add_argument("--transports", default="nats,rest")
    ap.add_argument(
        "--procs", type=int, default=4,
        help="opener processes (each its own event loop and client; at most C per row)",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="sample the registry with py-spy")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="streamboot-bench-opens-"))
    work.chmod(0o711)  # the embedded postgres may run as another user
    uvloop.run(main_async(args, work))


if __name__ == "__main__":
    main()
