"""Loading the `streamboot` CLI imports none of the heavy client libraries: every command
runs in a fresh process (an operator's shell, the tests' subprocesses), so what the command
tree imports is paid on each run, `--help` included. A command imports its NATS, HTTP,
PostgreSQL, telemetry and settings dependencies inside its own function
(streamboot/commands/__init__.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

# Top-level packages only a command that talks to the running system needs.
DEFERRED = (
    "asyncpg",
    "faststream",
    "httpx",
    "nats",
    "opentelemetry",
    "psutil",
    "pydantic_settings",
    "uvloop",
)

# Imports the CLI, then builds the click command tree as `--help` does (typer resolves every
# parameter's annotation there), and prints the top-level packages loaded after each step.
PROBE = """
import json, sys
import streamboot.cli
loaded = sorted({m.split(".")[0] for m in sys.modules})
import typer.main
typer.main.get_command(streamboot.cli.app)
built = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"import": loaded, "command tree": built}))
"""


def test_loading_the_cli_imports_no_heavy_client_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for step, packages in json.loads(out).items():
        eager = sorted(set(DEFERRED) & set(packages))
        assert not eager, f"{step} of streamboot.cli loads {eager}: import them in the command"
