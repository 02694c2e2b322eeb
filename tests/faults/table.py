"""Write the fault suite's results (JSON lines from STREAMBOOT_FAULTS_RESULTS) as the table
in docs/reliability.md, between its markers: `make faults` runs this after the suite.

    python -m tests.faults.table build/faults.jsonl docs/reliability.md
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- faults-table -->", "<!-- /faults-table -->"
COLUMNS = [
    ("fault", "Fault"),
    ("client", "Client"),
    ("writes", "Writes"),
    ("stall_s", "Client stalled (s)"),
    ("recovered_s", "Recovered after (s)"),
    ("acked_lost", "Acknowledged writes lost"),
    ("events_before", "Events before"),
    ("events_lost", "Events lost"),
    ("events_doubled", "Events doubled"),
]


def render(rows: list[dict[str, object]]) -> str:
    lines = [
        f"Made by `make faults` on {time.strftime('%Y-%m-%d', time.gmtime())} "
        f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    results, doc = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest:
        sys.exit(f"{doc}: no {BEGIN} ... {END} markers")
    doc.write_text(f"{head}{BEGIN}\n{render(rows)}\n{END}{tail}")
    print(f"{doc}: {len(rows)} faults")


if __name__ == "__main__":
    main()
