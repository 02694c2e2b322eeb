"""Small helpers the benchmarks share."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def wait_port(port: int, timeout_s: float = 15, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def cpu_ms(pids: Iterable[int]) -> float:
    """CPU time (user + system) these processes have used so far, in ms, their ended
    threads included (nbdkit runs a thread per connection). ``/proc/PID/stat`` counts in
    ticks of 10 ms: average over many rounds for a figure of a few ms."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes and all their descendants, the reaped ones included."""
    total = 0.0
    for pid in pids:
        try:
            top = psutil.Process(pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total
