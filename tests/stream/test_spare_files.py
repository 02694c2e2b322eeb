"""Disk files for write-cache mirrors are made ahead of the first writes
(services/stream/path/spare_files.py), and a real client's first write takes one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from services.stream.path import spare_files
from services.stream.path.spare_files import SpareFiles
from tests.conftest import wait_for
from tests.stream.conftest import ServerThread, is_open
from tests.stream.test_clients import qemu_io


async def test_spares_are_made_ahead_taken_and_made_again(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path, keep=3)
    spares.make_when_quiet()
    await wait_for(lambda: len(spares._fds) == 3, "spares made")
    ready = list(spares._fds)
    assert not os.listdir(tmp_path)  # no names: they vanish with the process

    taken = [spares.take() for _ in range(5)]  # 3 made ahead, 2 made on the spot
    assert set(ready) <= set(taken) and len(set(taken)) == 5
    for i, fd in enumerate(taken):
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 0
        os.pwrite(fd, bytes([i]) * 4096, i * 4096)
        assert os.pread(fd, 4096, i * 4096) == bytes([i]) * 4096
    assert not os.listdir(tmp_path)

    await wait_for(lambda: len(spares._fds) == 3, "spares made again")  # once takes paused
    again = list(spares._fds)
    assert not set(again) & set(taken)
    spares.close()
    assert not any(is_open(fd) for fd in again)
    for fd in taken:  # the takers own theirs
        assert is_open(fd)
        os.close(fd)


async def test_without_o_tmpfile_a_named_file_is_made_and_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_tmpfile(path, flags, mode=0o777, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(spare_files.os, "open", no_tmpfile)
    fd = SpareFiles(tmp_path).take()
    assert os.fstat(fd).st_nlink == 0 and not os.listdir(tmp_path)
    os.close(fd)


async def test_a_directory_that_cannot_hold_files_is_an_error_at_the_first_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spares = SpareFiles(tmp_path / "gone")
    spares.make_when_quiet()
    await wait_for(lambda: "spare write-cache files not made" in caplog.text, "the warning")
    assert str(tmp_path / "gone") in caplog.text and not spares._fds
    with pytest.raises(FileNotFoundError):
        spares.take()
    spares.close()


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server(session_linger_s=60.0)


def test_a_sessions_first_write_takes_a_file_made_ahead(server: ServerThread) -> None:
    spares = server.servers.sessions.spares
    server.wait_until(
        lambda: len(spares._fds) >= spares.keep, "the node made no spare files after starting"
    )
    ready = server.call(lambda: list(spares._fds))

    qemu_io(f"{server.nbd}/tok-b", "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")

    session = server.call(lambda: server.servers.sessions.sessions["tok-b"])
    assert session.backend.kind == "server-disk"
    assert session.backend.fd in ready  # its mirror was made before the client came
    qemu_io(f"{server.nbd}/tok-b", "read -P 0x5a 1M 64k", read_only=True)
