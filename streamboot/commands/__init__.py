"""CLI commands, one module each; `streamboot.cli` registers them with one line per module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.settings import default_data_dir

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
