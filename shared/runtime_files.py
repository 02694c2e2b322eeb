"""Where a running `streamboot up` is found: its data dir and the files it writes there.

Free of the settings machinery (pydantic-settings), because every CLI command reads these
before it needs anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUNTIME_FILE = "runtime.json"
API_TOKEN_FILE = "api-token"


def default_data_dir() -> Path:
    return Path(os.environ.get("STREAMBOOT_DATA_DIR", ".streamboot"))


def runtime_info(data_dir: Path) -> dict[str, str]:
    """The endpoints a running `streamboot up` wrote into its data dir (empty when not running)."""
    path = Path(data_dir) / RUNTIME_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
