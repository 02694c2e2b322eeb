"""Small state files only the service's own user may read (0600), replaced atomically.

They name vdisks, sessions and client MACs; nothing else on the machine needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

MODE = 0o600


def replace_private(path: Path, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` (a new file renamed over it: readers see the old or
    the new text, whole). ``durable``: on disk, file and rename, before this returns."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, MODE)  # a leftover tmp keeps its old mode through O_CREAT
        f.write(text)
        f.flush()
        if durable:
            os.fsync(fd)
    os.rename(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
