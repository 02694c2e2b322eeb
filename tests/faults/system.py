"""The system under fault: `streamboot up` as a user starts it, its servers on a veth pair
whose far end is a network namespace holding the live client (so the client's link can go
down), and a small tmpfs as the server-ram write caches' file system (so it can fill up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from streamboot.embedded.proc import free_port
from streamboot.supervisor import PORT_FIELDS
from tests.e2e.test_system import cli, events, wait_all_alive
from tests.e2e.test_up import AVAILABLE, START_TIMEOUT_S, Up

RAM_FS_BYTES = 48 << 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class ClientNet:
    """A network namespace joined to this host by a veth pair: HOST_IP here, CLIENT_IP there."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.ns = f"sbf{tag}"
        self.host_if, self.client_if = f"sbf{tag}h", f"sbf{tag}c"
        net = f"10.{200 + tag % 50}.{tag % 250}"
        self.host_ip, self.client_ip = f"{net}.1", f"{net}.2"
        self.close()  # what a killed earlier run left
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if)
        sh("ip", "link", "set", self.client_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.in_ns("ip", "addr", "add", f"{self.client_ip}/24", "dev", self.client_if)
        self.in_ns("ip", "link", "set", self.client_if, "up")
        self.in_ns("ip", "link", "set", "lo", "up")

    def in_ns(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.ns, *args)

    def link(self, up: bool) -> None:
        """The client's end of the link up or down (the host keeps its address)."""
        self.in_ns("ip", "link", "set", self.client_if, "up" if up else "down")

    def close(self) -> None:
        with suppress(subprocess.CalledProcessError):
            sh("ip", "link", "del", self.host_if)
        with suppress(subprocess.CalledProcessError):
            sh("ip", "netns", "del", self.ns)


class RamFs:
    """A size-limited tmpfs for the server-ram write caches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        sh("mount", "-t", "tmpfs", "-o", f"size={RAM_FS_BYTES},mode=0700", "tmpfs", str(path))
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte (as another tenant of the file system would)."""
        chunk = b"\xff" * (1 << 20)
        with open(self.filler, "wb", buffering=0) as f:
            with suppress(OSError):  # ENOSPC: full
                while True:
                    f.write(chunk)
            with suppress(OSError):
                while True:
                    f.write(chunk[:4096])

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        with suppress(subprocess.CalledProcessError):
            sh("umount", "-l", str(self.path))


class System:
    """One `streamboot up` with fixed ports (a restarted `up` serves where the client
    reconnects), bound to the veth's host address."""

    def __init__(self, data_dir: Path, host_ip: str, ram_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {f"STREAMBOOT_{f.upper()}": str(free_port()) for f in PORT_FIELDS}
        self.env.update(
            STREAMBOOT_BIND_HOST=host_ip,
            STREAMBOOT_CACHE_RAM_DIR=str(ram_dir),
            # The host's one client address changes with the netns: no address pinning.
            STREAMBOOT_CLIENT_ADDRESS_CHECK="false",
        )
        self.up = self.start()

    def start(self) -> Up:
        up = Up(self.data_dir, AVAILABLE, **self.env)
        up.wait_running()
        wait_all_alive(self.data_dir, timeout_s=START_TIMEOUT_S)
        return up

    def pid(self, name: str) -> int:
        """The pid of a service, of nats-server or postgres (its postmaster), or of `up`."""
        if name == "up":
            return self.up.proc.pid
        if name in AVAILABLE:
            return int(json.loads((self.data_dir / "runtime.json").read_text())["services"][name])
        [child] = [p for p in psutil.Process(self.up.proc.pid).children() if p.name() == name]
        return child.pid

    def kill(self, name: str) -> None:
        """kill -9; `up` itself is then started again as its init system would."""
        os.kill(self.pid(name), signal.SIGKILL)
        if name == "up":
            self.up.proc.wait(timeout=60)
            self.up = self.start()

    def healthy(self, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        return wait_all_alive(self.data_dir, timeout_s=timeout_s)

    def restarted(self, name: str, old_pid: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until ``name`` runs again under a new pid."""
        deadline = time.monotonic() + timeout_s
        while True:
            with suppress(ValueError, KeyError, OSError, json.JSONDecodeError):
                if self.pid(name) != old_pid:
                    return
            assert self.up.proc.poll() is None, f"up exited:\n{self.up.output}"
            assert time.monotonic() < deadline, f"{name} not started again:\n{self.up.output}"
            time.sleep(0.2)

    def events(self) -> list[dict[str, Any]]:
        return events(self.data_dir, "--limit", "10000000")

    def cli(self, *args: str) -> str:
        return cli(self.data_dir, *args).stdout

    def stop(self) -> None:
        if self.up.proc.poll() is None:
            self.up.stop()
