"""Write the NATS permission matrix (shared/bus_access.py) where it is copied: the
`authorization` blocks of compose.yaml and deploy/nomad/streamboot.nomad.hcl, and the
table of docs/security.md. Run it after changing the matrix:

    uv run python deploy/render_nats_auth.py

tests/deploy/test_deploy_files.py and tests/foundation/test_bus_access.py fail until the
copies agree with the matrix.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.bus_access import ROLES, authorization_block, matrix_table, role_users  # noqa: E402


def compose_block() -> str:
    """Passwords from compose's required variables; every other `$` escaped (`$$`)."""
    passwords = {
        r: f"${{STREAMBOOT_NATS_PASSWORD_{r.upper()}:?set STREAMBOOT_NATS_PASSWORD_{r.upper()}}}"
        for r in ROLES
    }
    block = authorization_block(role_users(passwords)).replace("$", "$$")
    return block.replace("$${STREAMBOOT", "${STREAMBOOT")


def nomad_block() -> str:
    """Passwords from the Nomad variables (inside the template's `with nomadVar`)."""
    return authorization_block(role_users({r: f"{{{{ .nats_password_{r} }}}}" for r in ROLES}))


def replace_block(text: str, block: str, indent: str) -> str:
    start = text.index(indent + "authorization {")
    end = text.index(f"\n{indent}}}\n", start) + len(indent) + 3
    return text[:start] + "".join(indent + line + "\n" for line in block.splitlines()) + text[end:]


def replace_table(text: str) -> str:
    start = text.index("| role | publishes |")
    end = text.index("\n\n", start) + 1
    return text[:start] + matrix_table() + text[end:]


def main() -> None:
    edits = {
        ROOT / "compose.yaml": lambda t: replace_block(t, compose_block(), " " * 6),
        ROOT / "deploy" / "nomad" / "streamboot.nomad.hcl": lambda t: replace_block(
            t, nomad_block(), " " * 10
        ),
        ROOT / "docs" / "security.md": replace_table,
    }
    for path, edit in edits.items():
        before = path.read_text()
        after = edit(before)
        if after != before:
            path.write_text(after)
            print(f"updated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
