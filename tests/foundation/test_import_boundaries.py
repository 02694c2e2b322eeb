"""The import graph keeps the process boundaries: services talk only over NATS, so no
``services.X`` module imports ``services.Y``; ``shared`` (contracts included) imports no
service; the CLI (``streamboot``) talks to the running system and imports no service's
modules (``up`` starts the services as ``python -m services.X`` processes, not by import).

The graph is read with ``ast`` from every ``.py`` under services/, shared/ and streamboot/,
imports inside functions and under ``TYPE_CHECKING`` included: a lazy import crosses the
boundary as much as an eager one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "shared", "streamboot")

# What the CLI may still import from a service, as (importing module, imported module):
# nothing. What it runs locally (staging a vdisk into the store, overlaying a kept write
# cache, an NBD client) is built on shared/ (vdisk_store, the cache contract, nbd_wire).
# The test fails when an entry is no longer needed, so the list only shrinks.
CLI_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every name ``module``'s source imports: ``import a.b`` as ``a.b``, ``from a import
    b`` as ``a.b`` (:func:`violations` reads a name that is no module as its module's)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            tree = ast.parse(path.read_text(), str(path))
            is_package = path.name == "__init__.py"
            graph[module] = set(imported_modules(tree, module, is_package))
    return graph


def service_of(module: str) -> str | None:
    """``services.<name>`` for a module of a service, else None."""
    parts = module.split(".")
    if parts[0] == "services" and len(parts) >= 2:
        return ".".join(parts[:2])
    return None


def violations(graph: dict[str, set[str]]) -> tuple[list[str], set[tuple[str, str]]]:
    """(the broken rules, the CLI exceptions used). An imported name that is not a module
    of the graph (``from services.cache.wire import MAX_CHUNK``) is judged by its module."""
    found: list[str] = []
    used: set[tuple[str, str]] = set()
    for module, imports in sorted(graph.items()):
        top = module.split(".")[0]
        targets = set()
        for target in imports:
            while target not in graph and "." in target:
                target = target.rsplit(".", 1)[0]
            targets.add(target)
        for target in sorted(targets):
            if target.split(".")[0] != "services" or target == "services":
                continue
            if top == "services":
                mine, theirs = service_of(module), service_of(target)
                if theirs is not None and mine != theirs:
                    found.append(f"{module} imports {target} (another service)")
            elif top == "shared":
                found.append(f"{module} imports {target} (shared imports no service)")
            elif top == "streamboot":
                if (module, target) in CLI_EXCEPTIONS:
                    used.add((module, target))
                else:
                    found.append(f"{module} imports {target} (the CLI imports no service)")
    return found, used


def test_no_import_crosses_a_process_boundary() -> None:
    found, used = violations(import_graph(ROOT))
    assert not found, "\n".join(found)
    assert used == CLI_EXCEPTIONS, f"no longer needed, remove: {sorted(CLI_EXCEPTIONS - used)}"


def write(root: Path, files: dict[str, str]) -> None:
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {
                "services/stream/__init__.py": "",
                "services/stream/path.py": "from services.cache import wire\n",
                "services/cache/__init__.py": "",
                "services/cache/wire.py": "",
            },
            "services.stream.path imports services.cache.wire (another service)",
        ),
        (
            {
                "services/registry/__init__.py": "",
                "services/registry/app.py": "def f():\n    import services.stream.announce\n",
                "services/stream/__init__.py": "",
                "services/stream/announce.py": "",
            },
            "services.registry.app imports services.stream.announce (another service)",
        ),
        (
            {
                "shared/bus.py": "from services.cache.wire import MAX\n",
                "services/cache/__init__.py": "",
                "services/cache/wire.py": "",
            },
            "shared.bus imports services.cache.wire (shared imports no service)",
        ),
        (
            {
                "streamboot/cli.py": "from services.boot.service import leases_path\n",
                "services/boot/__init__.py": "",
                "services/boot/service.py": "",
            },
            "streamboot.cli imports services.boot.service (the CLI imports no service)",
        ),
    ],
)
def test_each_rule_catches_its_crossing(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    write(tmp_path, files)
    found, _ = violations(import_graph(tmp_path))
    assert found == [expected]


def test_imports_within_a_service_and_of_shared_pass(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "services/cache/__init__.py": "",
            "services/cache/service.py": "from . import wire\nfrom shared import bus\n",
            "services/cache/wire.py": "from shared.contracts.cache import wire\n",
            "shared/bus.py": "import json\n",
            "streamboot/cli.py": "from shared import bus\n",
        },
    )
    assert violations(import_graph(tmp_path)) == ([], set())
