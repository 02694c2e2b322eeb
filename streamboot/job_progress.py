"""The CLI's side of a job at the registry (services/registry/jobs.py): an import reports
its progress there, so the console shows it live, and keeps it alive while a phase
reports nothing (the registry marks a job nobody keeps alive interrupted)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from shared.errors import reason

End = Callable[..., None]
# Well inside the registry's lease (services/registry/jobs.py LEASE).
KEEPALIVE_S = 15.0


@contextlib.contextmanager
def reporting(
    client: Any, vdisk: str, every_s: float = 0.5, keepalive_s: float = KEEPALIVE_S
) -> Iterator[tuple[Callable[[str, int, int], None], End]]:
    """For the CLI: a job at the registry and a Progress callback that reports to it at
    most every ``every_s`` (and at each new phase), and again every ``keepalive_s`` while
    nothing new comes. A registry that refuses the reports (an older one, a token that may
    not) leaves the import as it is, unreported."""
    try:
        job_id: str | None = client.post("/jobs", {"kind": "import", "vdisk": vdisk})["id"]
    except Exception:
        job_id = None
    last: dict[str, Any] = {"at": 0.0, "phase": "", "report": None}
    lock = threading.Lock()  # one request at a time on the client: reports, keep-alives
    stop = threading.Event()

    def send(report: dict[str, Any]) -> None:
        nonlocal job_id
        with lock:
            if job_id is None:
                return
            try:
                client.put(f"/jobs/{job_id}", report)
            except Exception:
                job_id = None
            last["at"] = time.monotonic()

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if job_id is None or (phase == last["phase"] and now - last["at"] < every_s):
            return
        last.update(phase=phase, report={"phase": phase, "done": done, "total": total})
        send(last["report"])

    def keep_alive() -> None:
        while not stop.wait(keepalive_s / 3):
            if last["report"] is not None and time.monotonic() - last["at"] >= keepalive_s:
                send(last["report"])

    def end(
        version: int | None = None, error: str | None = None, interrupted: bool = False
    ) -> None:
        stop.set()
        with lock:
            if job_id is not None:
                body = {"version": version, "error": error, "interrupted": interrupted}
                with contextlib.suppress(Exception):
                    client.post(f"/jobs/{job_id}/end", body)

    keeper = threading.Thread(target=keep_alive, name="job-keepalive", daemon=True)
    keeper.start()
    try:
        yield progress, end
    except Exception as exc:
        end(error=reason(exc))
        raise
    except BaseException:  # Ctrl-C, a signal: stopped, not failed
        end(error="stopped before the end (Ctrl-C or a signal)", interrupted=True)
        raise
    finally:
        stop.set()
        keeper.join()
