"""Tables whose ids survive a narrow terminal: session ids, MACs and tokens are copied
from the CLI's output into the next command, so they are never cut ("01890a5d-ac9…") or
wrapped. A table that fits is drawn as usual; one that does not becomes one block per row:
its ids whole on the first line, the other fields after them, wrapping as text does."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

# What a table's frame takes per column (borders, padding) and at its edges.
PER_COLUMN = 3
EDGES = 1


def needed_width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return sum(widths) + PER_COLUMN * len(headers) + EDGES


def print_rows(
    console: Console,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    ids: Sequence[str],
    title: str | None = None,
) -> None:
    """``rows`` under ``headers``; the columns named in ``ids`` are never cut."""
    if needed_width(headers, rows) <= console.width:
        table = Table(title=title)
        for h in headers:
            table.add_column(h, no_wrap=h in ids)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    if title:
        console.print(title, style="italic")
    keep = [i for i, h in enumerate(headers) if h in ids]
    rest = [i for i, h in enumerate(headers) if h not in ids]
    for r in rows:
        console.print(Text("  ".join(r[i] for i in keep), style="bold"), soft_wrap=True)
        console.print(
            Text("  " + " · ".join(f"{headers[i]} {r[i]}" for i in rest)), soft_wrap=False
        )
