"""The CLI's side of a job at the registry (services/registry/jobs.py): an import reports
its progress there, so the console shows it live."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from shared.errors import reason

End = Callable[..., None]


@contextlib.contextmanager
def reporting(
    client: Any, vdisk: str, every_s: float = 0.5
) -> Iterator[tuple[Callable[[str, int, int], None], End]]:
    """For the CLI: a job at the registry and a Progress callback that reports to it at
    most every ``every_s`` (and at each new phase). A registry that refuses the reports
    (an older one, a token that may not) leaves the import as it is, unreported."""
    try:
        job_id: str | None = client.post("/jobs", {"kind": "import", "vdisk": vdisk})["id"]
    except Exception:
        job_id = None
    last = {"at": 0.0, "phase": ""}

    def progress(phase: str, done: int, total: int) -> None:
        nonlocal job_id
        now = time.monotonic()
        if job_id is None or (phase == last["phase"] and now - last["at"] < every_s):
            return
        last.update(at=now, phase=phase)
        try:
            client.put(f"/jobs/{job_id}", {"phase": phase, "done": done, "total": total})
        except Exception:
            job_id = None

    def end(version: int | None = None, error: str | None = None) -> None:
        if job_id is not None:
            with contextlib.suppress(Exception):
                client.post(f"/jobs/{job_id}/end", {"version": version, "error": error})

    try:
        yield progress, end
    except BaseException as exc:
        end(error=reason(exc) if isinstance(exc, Exception) else "interrupted")
        raise
