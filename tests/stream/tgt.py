"""tgtd (Debian's ``tgt``, the reference iSCSI target) serving one image on loopback, for the
conformance test and bench/iscsi.py. Needs root."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

TGT_IQN = "iqn.2026-12.test:tgt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tgt_target(image: Path) -> Iterator[str]:
    """tgtd on a free port with ``image`` as LUN 1 (tgt's LUN 0 is its controller); yields
    the libiscsi URL."""
    # Its own control socket (-C), so it never meets another tgtd on the machine.
    port, control = free_port(), 1000 + os.getpid() % 30000
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        adm = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
        for _ in range(100):  # until tgtd listens on its control socket
            show = subprocess.run([*adm, "--op", "show", "--mode", "sys"], capture_output=True)
            if show.returncode == 0:
                break
            time.sleep(0.1)
        for args in (
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN],
            ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(image)],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ):
            subprocess.run([*adm, *args], check=True, capture_output=True)
        yield f"iscsi://127.0.0.1:{port}/{TGT_IQN}/1"
    finally:
        proc.kill()  # tgtd ignores SIGTERM while it has targets
        proc.wait(10)
