"""CLI commands, one module each; `streamboot.cli` registers them with one line per module.

Command modules import their heavy dependencies (settings, NATS, HTTP, PostgreSQL, telemetry)
inside the command functions: every CLI run loads the whole command tree, so each command
pays only for what it uses and `--help` stays instant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from shared.runtime_files import default_data_dir

# Every command finds the running system through its data dir (runtime.json, api-token).
DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="STREAMBOOT_DATA_DIR",
        default_factory=default_data_dir,
        help="streamboot data dir (env STREAMBOOT_DATA_DIR, default ./.streamboot)",
        show_default=False,
    ),
]


_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def as_mac(value: str) -> str | None:
    """A MAC in its normal form (``aa:bb:cc:dd:ee:ff``) from any usual spelling; None
    when ``value`` is not one."""
    m = value.strip().lower()
    if not _MAC.match(m):
        return None
    digits = m.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def mac_argument(value: str) -> str:
    """A MAC typed by an operator in its normal form, or a usage error naming the
    expected shape."""
    mac = as_mac(value)
    if mac is None:
        raise typer.BadParameter(
            f"{value!r} is not a MAC address: expected six hex octets like 52:54:00:12:34:56"
        )
    return mac
