"""Run a QEMU VM (TCG) on a disk and watch its serial console for the client's markers."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

BOOT_TIMEOUT_S = 120.0


@dataclass
class VmResult:
    console: str
    seconds: float
    returncode: int | None

    def lines(self, prefix: str = "streamboot-client: ") -> list[str]:
        return [
            line.split(prefix, 1)[1].strip() for line in self.console.splitlines() if prefix in line
        ]


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


def boot_vm(
    drive: str,
    *,
    extra: list[str] | None = None,
    replace_nic: bool = False,
    timeout_s: float = BOOT_TIMEOUT_S,
) -> VmResult:
    """Boot from ``drive`` (a path or an nbd:// URI) until the VM powers itself off."""
    argv = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nographic",
        "-no-reboot", *([] if replace_nic else ["-nic", "none"]),
        "-serial", "stdio", "-monitor", "none",
        "-drive", f"file={drive},format=raw,if=virtio",
        *(extra or []),
    ]  # fmt: skip
    start = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
        out, rc = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = exc.stdout or b"", None
    return VmResult(out.decode(errors="replace"), time.monotonic() - start, rc)
