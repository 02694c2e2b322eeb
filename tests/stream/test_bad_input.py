"""Bad and hostile NBD/HTTP input: each case ends in a clean error or a disconnect, the
server keeps serving, and other sessions are unaffected.

Bad input is crafted on raw sockets (tests/stream/nbdraw.py); timeouts are short here so
idle, stalled and half-finished connections are ended quickly.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from shared import nbd_wire as W
from shared.events import SessionDetached
from tests.stream.conftest import IMAGE_SIZE, ServerThread
from tests.stream.nbdraw import RawNbd


@pytest.fixture(scope="module", params=[True, False], ids=["sendfile", "uvloop"])
def server(make_server, request) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server(
        nbd_zero_copy=request.param,
        handshake_timeout_s=1.0,
        idle_timeout_s=1.0,
        stall_timeout_s=1.0,
        session_linger_s=0.0,
        keepalive_idle_s=1,
        keepalive_interval_s=1,
        keepalive_count=2,
    )


@pytest.fixture(scope="module")
def image(images) -> bytes:  # type: ignore[no-untyped-def]
    return images["base"].read_bytes()


def assert_healthy(server: ServerThread, image: bytes) -> None:
    """Another session still gets correct data."""
    c = RawNbd(server.servers.nbd_port)
    size, _ = c.go("tok-ro")
    assert size == IMAGE_SIZE
    assert c.read(123 * 4096, 8192) == image[123 * 4096 : 125 * 4096]
    c.close()


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    # Polls for an effect of the server's own timers; no assertion on how long it took.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def detached(server: ServerThread, session_id: str, reason: str) -> bool:
    return any(
        e.session_id == session_id and e.reason == reason for e in server.events(SessionDetached)
    )


def test_truncated_handshake_then_close(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.greeting()
    c.sock.sendall(b"\x00\x00")  # half of the client flags
    c.close()
    assert_healthy(server, image)


def test_truncated_handshake_left_hanging_is_closed(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.start()
    c.sock.sendall(struct.pack(">Q", W.IHAVEOPT))  # an option header cut short
    assert c.closed_by_peer()  # by the handshake timeout
    assert_healthy(server, image)


def test_bad_client_flags(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.greeting()
    c.sock.sendall(W.CLIENT_FLAGS.pack(0x80))  # unknown flag, no FIXED_NEWSTYLE
    assert c.closed_by_peer()


def test_bad_option_magic(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.start()
    c.sock.sendall(W.OPTION.pack(0xDEADBEEF, W.OPT_GO, 0))
    assert c.closed_by_peer()
    assert_healthy(server, image)


def test_unknown_option_unsupported_then_next_option_read(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.start()
    c.option(99, b"whatever")
    assert c.option_reply() == (99, W.REP_ERR_UNSUP, b"")
    c.option(W.OPT_STARTTLS)
    assert c.option_reply()[1] == W.REP_ERR_UNSUP
    name = b"nope"
    c.option(W.OPT_INFO, struct.pack(">I", 4) + name + struct.pack(">H", 0))
    assert c.option_reply()[1] == W.REP_ERR_UNKNOWN
    c.option(W.OPT_ABORT)
    assert c.option_reply()[:2] == (W.OPT_ABORT, W.REP_ACK)
    assert c.closed_by_peer()


def test_export_name_unknown_token_disconnects(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.start()
    c.option(W.OPT_EXPORT_NAME, b"unknown")
    assert c.closed_by_peer()


def test_go_with_unknown_tokens_leaves_nothing_behind(server: ServerThread, image: bytes) -> None:
    for i in range(100):
        c = RawNbd(server.servers.nbd_port)
        with pytest.raises(ConnectionError, match="GO refused"):
            c.go(f"nobody-{i}")
        c.close()
    assert server.call(lambda: len(server.servers.sessions._opening)) == 0
    assert_healthy(server, image)


def test_oversized_option_length(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.start()
    c.sock.sendall(W.OPTION.pack(W.IHAVEOPT, W.OPT_GO, 0xFFFFFFF0))
    assert c.option_reply()[1] == W.REP_ERR_TOO_BIG
    assert c.closed_by_peer()
    assert_healthy(server, image)


def test_oversized_and_out_of_range_requests(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-a")
    c.request(W.CMD_READ, 7, 0, 64 * 1024 * 1024)  # over the 32 MiB maximum
    assert c.reply() == (W.EINVAL, 7)
    c.request(W.CMD_READ, 8, IMAGE_SIZE, 512)  # offset past the end
    assert c.reply() == (W.EINVAL, 8)
    c.request(W.CMD_READ, 9, IMAGE_SIZE - 512, 1024)  # runs past the end
    assert c.reply() == (W.EINVAL, 9)
    assert c.write(IMAGE_SIZE - 512, b"x" * 1024, handle=10) == W.ENOSPC
    c.request(W.CMD_WRITE_ZEROES, 11, IMAGE_SIZE, 4096)
    assert c.reply() == (W.ENOSPC, 11)
    c.request(77, 12, 0, 0)  # unknown command
    assert c.reply() == (W.EINVAL, 12)
    # The connection is still good.
    assert c.read(0, 4096, handle=13) == image[:4096]
    c.close()


def test_oversized_write_disconnects(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-a")
    c.request(W.CMD_WRITE, 1, 0, 0x7FFFFFFF)  # a payload we will never buffer
    assert c.closed_by_peer()
    assert_healthy(server, image)


def test_bad_request_magic_disconnects(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-a")
    c.sock.sendall(b"\x00" * W.REQUEST.size)
    assert c.closed_by_peer()
    assert detached(server, "session-tok-a", "protocol-error")
    assert_healthy(server, image)


def test_disconnect_mid_request(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-b")
    c.sock.sendall(W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_WRITE, 1, 0, 65536) + b"y" * 1000)
    c.close()
    assert wait_for(lambda: detached(server, "session-tok-b", "disconnect"))
    # The half-sent write never happened: the session was dropped (linger 0) and a new
    # connection starts from the image.
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-b")
    assert c.read(0, 4096) == image[:4096]
    c.close()
    assert_healthy(server, image)


def test_slow_client_that_never_reads_is_dropped(server: ServerThread, image: bytes) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.go("tok-v2")
    # 256 MiB of replies asked for, none read.
    for h in range(16):
        c.request(W.CMD_READ, h, 0, 16 * 1024 * 1024)
    assert wait_for(lambda: detached(server, "session-tok-v2", "stalled"))
    assert_healthy(server, image)  # the loop was never blocked by it
    assert "session-tok-v2" not in server.live_sessions()
    c.close()


def test_vanished_client_is_timed_out_and_session_freed(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-b")
    assert "session-tok-b" in server.live_sessions()
    # The client goes silent without closing: the idle timeout ends it.
    assert c.closed_by_peer()
    assert wait_for(lambda: detached(server, "session-tok-b", "idle-timeout"))
    assert wait_for(lambda: "session-tok-b" not in server.live_sessions())


def test_server_side_keepalive_is_on(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-ro")

    def keepalive_of_accepted() -> list[int]:
        out = []
        for s in server.servers.sessions.sessions.values():
            for conn in s.conns:
                sock = conn.transport.get_extra_info("socket")
                out.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        return out

    assert 1 in server.call(keepalive_of_accepted)
    c.close()


def test_http_bad_requests(server: ServerThread) -> None:
    def exchange(raw: bytes) -> bytes:
        s = socket.create_connection(("127.0.0.1", server.servers.http_port), timeout=10)
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data

    assert exchange(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(b"POST /s/tok-ro HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 405"
    )
    assert exchange(b"GET /other HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404")
    resp = exchange(b"GET /s/tok-ro HTTP/1.1\r\nRange: bytes=5-1\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 416")
    # A head that never ends is cut off, not buffered forever.
    assert exchange(b"GET /s/tok-ro HTTP/1.1\r\n" + b"X: " + b"a" * 20000).startswith(
        b"HTTP/1.1 431"
    )


def test_http_hostile_heads_get_an_answer_and_one_log_line(
    server: ServerThread, image: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    def exchange(raw: bytes) -> bytes:
        s = socket.create_connection(("127.0.0.1", server.servers.http_port), timeout=10)
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
        s.close()
        return bytes(data)

    def get(*headers: bytes) -> bytes:
        return exchange(
            b"GET /s/tok-ro HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        )

    huge = b"9" * 5000
    caplog.set_level("INFO", logger="services.stream")
    assert get(b"Range: bytes=" + huge + b"-").startswith(b"HTTP/1.1 416")
    assert get(b"Range: bytes=-" + huge, b"Connection: close").startswith(b"HTTP/1.1 206")
    whole = get(b"Range: bytes=0-" + huge, b"Connection: close")
    head, _, body = whole.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206") and len(body) == len(image), (head, len(body))
    assert body == image
    assert get(b"Content-Length: -5").startswith(b"HTTP/1.1 400")
    assert get(b"Content-Length: " + huge).startswith(b"HTTP/1.1 400")
    # 17 KB of head in one piece: over the 16 KiB limit even though its end is there.
    assert get(b"X: " + b"a" * 17_000).startswith(b"HTTP/1.1 431")
    server.wait_idle()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    refused = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m.split(" to ")[0] for m in refused] == [
        "http: 416",
        "http: 400",
        "http: 400",
        "http: 431",
    ]
    assert_healthy(server, image)


def evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def test_http_client_that_half_closes_gets_the_whole_answer(
    server: ServerThread, images: dict[str, Path], image: bytes
) -> None:
    """A client may shut its sending side once its request is out (``nc -N`` does): the
    answer is still sent whole, also when the body's first read has to wait for the disk
    after the head has gone out and the server's send buffer is empty."""
    evict_from_page_cache(images["base"])
    release = threading.Event()

    def occupy_workers() -> None:
        # The server's cold read queues behind these in the loop's worker threads.
        for _ in range(64):
            server.loop.run_in_executor(None, release.wait, 30)

    try:
        server.call(occupy_workers)
        s = socket.create_connection(("127.0.0.1", server.servers.http_port), timeout=10)
        s.sendall(b"GET /s/tok-ro HTTP/1.1\r\nConnection: close\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = bytearray()
        while b"\r\n\r\n" not in data and (chunk := s.recv(1 << 20)):
            data += chunk
    finally:
        release.set()
    while chunk := s.recv(1 << 20):
        data += chunk
    s.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) == len(image), (len(body), len(image))
    assert body == image


def test_out_of_order_reply_for_cold_read(server: ServerThread, images) -> None:  # type: ignore[no-untyped-def]
    """A read that must wait for the disk does not hold up one served from memory."""
    base: Path = images["base"]
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-a")
    assert c.write(0, b"w" * 4096, handle=1) == 0  # in the RAM write cache
    evict_from_page_cache(base)
    cold = 30 * 1024 * 1024
    c.sock.sendall(
        W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_READ, 100, cold, 1024 * 1024)
        + W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_READ, 101, 0, 4096)
    )
    replies = {}
    order = []
    for _ in range(2):
        err, handle = c.reply()
        assert err == 0
        order.append(handle)
        replies[handle] = c.recv_exact(1024 * 1024 if handle == 100 else 4096)
    assert replies[101] == b"w" * 4096
    assert replies[100] == base.read_bytes()[cold : cold + 1024 * 1024]
    assert order == [101, 100]
    c.close()


def test_session_closed_by_registry_ends_its_connections(server: ServerThread) -> None:
    c = RawNbd(server.servers.nbd_port)
    c.go("tok-a")
    assert server.call(lambda: server.servers.close_session("session-tok-a")) is True
    assert c.closed_by_peer()
    assert wait_for(lambda: detached(server, "session-tok-a", "session-closed"))
    assert "session-tok-a" not in server.live_sessions()
    assert server.call(lambda: server.servers.close_session("session-tok-a")) is False
