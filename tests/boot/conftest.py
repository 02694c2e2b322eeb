"""The boot tests reuse the registry's fixtures (the real registry service on real NATS and
PostgreSQL) for the script and hand-off endpoints, and a TFTP root and server for the TFTP
tests."""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.boot.tftp_server import TftpConfig, TftpServer, running
from tests.registry.conftest import data_dir, nc, registry  # noqa: F401


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "small.bin").write_bytes(os.urandom(100_000))
    (root / "exact.bin").write_bytes(os.urandom(4 * 512))  # ends with an empty block
    (root / "empty.bin").write_bytes(b"")
    (root / "sub" / "nested.bin").write_bytes(os.urandom(3000))
    (root / "text.txt").write_bytes(b"line one\nline two\r\nbare\rcr\n")
    (tmp_path / "secret").write_bytes(b"outside the root")
    (root / "link-out").symlink_to(tmp_path / "secret")
    (root / "link-in").symlink_to(root / "small.bin")
    return root


@pytest.fixture
async def server(root: Path) -> AsyncIterator[TftpServer]:
    async with running(TftpConfig(root=root, timeout_s=0.3, retries=2)) as server:
        yield server
