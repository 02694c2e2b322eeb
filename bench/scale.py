"""The scale table (issue 28): session opens, boot storms and idle sessions, in one run.

    uv run python bench/scale.py [--opens 1000] [--storm 200,500,1000] [--client-procs 4]
                                 [--idle 1000,10000] [--pxe 100] [--spread 1000]
                                 [--parts opens,storm,idle,pxe,spread]
                                 [--markdown scale-table.md]

Each part is one of the benches beside it, run as a child process, its rows read back as
JSON; the table printed at the end (and written as Markdown with ``--markdown``) is what
docs/scale.md shows:

- ``opens``: bench/session_opens.py: session opens per second through NATS and the REST
  API at 1, 10 and 100 concurrent openers (a real registry, PostgreSQL, NATS);
- ``storm``: bench/bootstorm.py at the fast pace: N clients replay the recorded boot over
  NBD at once, streamboot (cache service + stream node, announced sessions) against
  nbdkit's cow filter in the same run, the replay clients split over ``--client-procs``
  processes; p99 completion, errors, and the ratio of the p99s;
- ``idle``: bench/session_cost.py --idle: resident memory and descriptors per idle attached
  session, stream node and cache service, beside nbdkit-cow holding as many connections;
- ``pxe`` (root, not in the default parts): bench/pxestorm.py: ``--pxe`` simulated clients
  boot at once through DHCP, TFTP, the iPXE scripts, the boot files, the nonce and NBD, in
  a network namespace; clients lost, DHCP retransmits, each phase's p50/p99;
- ``spread`` (root, not in the default parts): bench/scaleout.py: two stream and two cache
  node processes, each in its own network namespace, and ``--spread`` sessions opened
  across them: sessions placed and held per stream node, write caches per cache node.

The goals: >= 500 opens/s over NATS; storm p99 <= 0.8x nbdkit-cow's at N = 1,000 with no
client lost; < 1 GiB resident for 10,000 idle sessions on a stream node.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scaleout import report  # noqa: E402

PARTS = ("opens", "storm", "idle")


def run_part(argv: list[str], out: Path) -> Any:
    """A bench as a child process (its own output passes through); its --json rows."""
    print(f"\n$ {' '.join(argv)}", flush=True)
    done = subprocess.run([sys.executable, *argv, "--json", str(out)], cwd=ROOT)
    if done.returncode != 0 or not out.exists():
        print(f"(exited {done.returncode}: no rows)")
        return []
    return json.loads(out.read_text())


def opens_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| via | concurrent openers | opens/s | p50 ms | p99 ms | errors | busy answers | CPU ms/open: registry | PostgreSQL | nats | the openers |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['via']} | {r['concurrency']} | {r['opens_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r.get('busy', 0)} | {r['registry_cpu_ms']:.2f} | "
            f"{r['postgres_cpu_ms']:.2f} | {r['nats_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |"
        )
    return out


def storm_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| N | cache | streamboot p99 s | nbdkit-cow p99 s | ratio | errors (sb / nbdkit) | server CPU ms per client (sb / nbdkit) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    by = {(r["server"], r["cache"], r["clients"]): r for r in rows}
    for (server, cache, n), r in sorted(by.items(), key=lambda x: (x[0][2], x[0][1])):
        peer = by.get(("nbdkit-cow", cache, n))
        if server != "streamboot" or peer is None:
            continue
        ratio = r["completion_p99"] / peer["completion_p99"]
        out.append(
            f"| {n} | {cache} | {r['completion_p99']:.3f} | {peer['completion_p99']:.3f} | "
            f"{ratio:.2f}x | {r['errors']} / {peer['errors']} | "
            f"{r['server_cpu_ms']:.1f} / {peer['server_cpu_ms']:.1f} |"
        )
    return out


def idle_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| sessions | process | RSS MiB | KiB per session | descriptors |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = r["process"] if r["server"] == "streamboot" else r["server"]
        out.append(
            f"| {r['sessions']} | {name} | {r['rss_mib']:.1f} | {r['kib_per_session']:.1f} | "
            f"{r['fds']} |"
        )
    return out


def pxe_table(summary: dict[str, Any]) -> list[str]:
    if not summary:
        return []
    out = [
        f"{summary['clients']} clients: {summary['booted']} booted, {summary['lost']} lost, "
        f"{summary['dhcp_retransmits']} DHCP retransmits, {summary['busy']} busy answers; "
        f"streamboot's processes {summary['server_cpu_s']:.1f} CPU s",
        "",
        "| phase | p50 s | p99 s | max s |",
        "|---|---|---|---|",
    ]
    for phase, v in summary.items():
        if isinstance(v, dict):
            out.append(f"| {phase} | {v['p50']:.2f} | {v['p99']:.2f} | {v['max']:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--opens", type=int, default=1000, help="opens per row")
    ap.add_argument("--storm", default="200,500,1000", help="storm sizes")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--idle", default="1000,10000", help="idle attached session counts")
    ap.add_argument("--pxe", type=int, default=100, help="simulated PXE clients")
    ap.add_argument("--spread", type=int, default=1000, help="sessions over the scale-out nodes")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    tables: list[str] = []
    if "opens" in parts:
        rows = run_part(
            ["bench/session_opens.py", "--opens", str(args.opens), "--concurrency", "1,10,100"],
            work / "opens.json",
        )
        tables += ["### Session opens", "", *opens_table(rows), ""]
    if "storm" in parts:
        rows = run_part(
            ["bench/bootstorm.py", "run", "--clients", args.storm, "--paces", "fast",
             "--servers", "streamboot,nbdkit-cow", "--rounds", "1",
             "--client-procs", str(args.client_procs)],
            work / "storm.json",
        )  # fmt: skip
        tables += ["### Boot storm (fast pace)", "", *storm_table(rows), ""]
    if "idle" in parts:
        rows = run_part(["bench/session_cost.py", "--idle", args.idle], work / "idle.json")
        tables += ["### Idle attached sessions", "", *idle_table(rows), ""]
    if "pxe" in parts:
        summary = run_part(["bench/pxestorm.py", "--clients", str(args.pxe)], work / "pxe.json")
        tables += ["### PXE storm (simulated clients)", "", *pxe_table(summary), ""]
    if "spread" in parts:
        result = run_part(
            ["bench/scaleout.py", "--sessions", str(args.spread)], work / "spread.json"
        )
        if result:
            tables += ["### Scale-out: two stream and two cache nodes", "", report(result), ""]
    text = "\n".join(tables)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
