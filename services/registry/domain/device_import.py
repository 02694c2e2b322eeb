"""Devices imported from a CSV file: every row checked, then all of them or none.

The file has a header row naming its columns (any order, case-insensitive): ``mac``
(required), ``hostname``, ``collection``, ``tester`` (yes/no, true/false, 1/0),
``kernel_args``, ``smbios_uuid`` (or ``uuid``) and ``vdisks`` (names separated by spaces or
``;``, the first one the default). Blank lines and lines starting with ``#`` are skipped.
Each row is decided by the same rules as ``device add`` (:func:`devices.register`) and
against the rows before it in the file (a hostname used twice in it is a conflict too); one
bad row refuses the whole file, with an error per bad row naming its line.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from services.registry.domain import devices
from services.registry.domain.errors import DomainError
from services.registry.domain.vdisks import get_vdisk
from services.registry.projection import Projection, Record
from shared.events import AssignmentChanged, DeviceRegistered, Event
from shared.identity import check_name

COLUMNS = ("mac", "hostname", "collection", "tester", "kernel_args", "smbios_uuid", "vdisks")
ALIASES = {"uuid": "smbios_uuid", "vdisk": "vdisks", "kernel-args": "kernel_args"}
MAX_ROWS = 10_000
# Errors listed per refused file; past this the answer says how many more.
MAX_ROW_ERRORS = 100
TRUE = {"yes", "y", "true", "1", "on"}
FALSE = {"no", "n", "false", "0", "off", ""}


class RowErrors(DomainError):
    """A file refused whole: ``rows`` holds ``{"line": n, "error": message}`` per bad row."""

    def __init__(self, message: str, rows: list[Record]) -> None:
        super().__init__(message, "invalid")
        self.rows = rows


def _refuse(rows: list[Record], total: int) -> RowErrors:
    bad = len({r["line"] for r in rows})
    shown = rows[:MAX_ROW_ERRORS]
    first = f"line {shown[0]['line']}: {shown[0]['error']}"
    return RowErrors(f"{bad} of {total} row(s) refused, nothing imported (first: {first})", shown)


def parse(text: str) -> tuple[list[tuple[int, Record]], int]:
    """(line number, row by column name) for each row of the file, and how many columns
    its header names; RowErrors when the header is not one this takes."""
    records: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text))
    try:
        for cells in reader:
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            records.append((reader.line_num, cells))
            if len(records) > MAX_ROWS + 1:
                raise RowErrors(f"more than {MAX_ROWS} rows: at most {MAX_ROWS} per file", [])
    except csv.Error as exc:
        line = reader.line_num
        raise RowErrors(
            f"line {line}: not CSV ({exc})", [{"line": line, "error": str(exc)}]
        ) from None
    if not records:
        raise RowErrors("the file has no header row (mac,hostname,...) and no rows", [])
    header_line, header = records[0]
    names = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    unknown = [h for h in names if h not in COLUMNS]
    problems = []
    if unknown:
        problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
    if "mac" not in names:
        problems.append("no 'mac' column")
    if len(set(names)) != len(names):
        problems.append("a column is named twice")
    if problems:
        error = "; ".join(problems) + f" (columns: {', '.join(COLUMNS)})"
        raise RowErrors(f"line {header_line}: {error}", [{"line": header_line, "error": error}])
    rows = [
        (n, {"_cells": len(cells), **dict(zip(names, cells, strict=False))})
        for n, cells in records[1:]
    ]
    return rows, len(names)


def _tester(value: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise DomainError(f"tester {value!r}: yes or no")


def register_rows(p: Projection, rows: list[tuple[int, Record]], columns: int) -> list[Event]:
    """The events registering every row (and assigning its vdisks), or RowErrors."""
    events: list[Event] = []
    errors: list[Record] = []
    taken: dict[str, dict[str, int]] = {"mac": {}, "hostname": {}, "smbios_uuid": {}}
    for line, row in rows:
        try:
            if row["_cells"] != columns:
                raise DomainError(f"{row['_cells']} fields where the header has {columns}")
            cell = {k: (v or "").strip() for k, v in row.items() if k != "_cells"}
            registered = devices.register(
                p,
                cell.get("mac", ""),
                hostname=cell.get("hostname") or None,
                smbios_uuid=cell.get("smbios_uuid") or None,
                collection=cell.get("collection") or None,
                tester=_tester(cell.get("tester", "")),
                kernel_args=cell.get("kernel_args") or None,
            )
            new = registered[0]
            assert isinstance(new, DeviceRegistered)
            for field in taken:
                value = getattr(new, field)
                if value and value in taken[field]:
                    raise DomainError(
                        f"{field} {value} is on line {taken[field][value]} of this file too",
                        "conflict",
                    )
            vdisks = list(dict.fromkeys(cell.get("vdisks", "").replace(";", " ").split()))
            for name in vdisks:
                get_vdisk(p, check_name(name))
        except DomainError as exc:
            errors.append({"line": line, "mac": row.get("mac"), "error": str(exc)})
            continue
        for field in taken:
            if getattr(new, field):
                taken[field][getattr(new, field)] = line
        events.append(new)
        if vdisks:
            events.append(
                AssignmentChanged(
                    target_kind="device", target=new.mac, vdisks=vdisks, default=vdisks[0]
                )
            )
    if errors:
        raise _refuse(errors, len(rows))
    if not rows:
        raise RowErrors("the file has a header and no rows: nothing to import", [])
    return events


def summary(events: list[Event]) -> dict[str, Any]:
    added = [e for e in events if isinstance(e, DeviceRegistered)]
    return {
        "imported": len(added),
        "devices": [{"mac": e.mac, "hostname": e.hostname} for e in added],
        "assigned": sum(1 for e in events if isinstance(e, AssignmentChanged)),
    }
