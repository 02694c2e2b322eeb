"""HTTP/1.1 request parsing: streamboot's own parser (``shared/http_head.py``, the boot
service's and the stream's range server's) against h11 and httptools, in the same run.

What is timed is what a server does per request of a keep-alive connection: take the head
(request line, headers, the empty line), learn method, target, version, the headers it
reads (Range, Connection, Content-Length), and decide keep-alive; for h11 also the
response it must pass through the state machine before the next request. The heads are
iPXE's and curl's (a 512-byte Range read of ``/s/<token>``, a boot script GET).

    uv run python bench/http_parse.py [--rounds N]

``--serve`` also times whole requests, the way iPXE's ``sanboot`` reads (512-byte Range
GETs one after another on one keep-alive connection), against the stream's range server
(``services.stream.standalone``) twice in the same run: as it is, and with its head parser
swapped for httptools in that process (the bench does the swap; nothing in streamboot
knows of it). Reported: requests/s and the server's CPU per request.

httptools is not a dependency: without it installed (``uv pip install httptools``) its
rows say so.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import cpu_ms
from shared import http_head

HEADS = [
    b"GET /s/Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0 HTTP/1.1\r\n"
    b"Host: 10.0.0.1:8081\r\nUser-Agent: iPXE/1.21.1\r\nRange: bytes=1048576-1049087\r\n"
    b"Connection: keep-alive\r\n\r\n",
    b"GET /boot.ipxe?mac=52-54-00-12-34-56&uuid=1234 HTTP/1.1\r\nHost: 10.0.0.1\r\n"
    b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
]


def ours(raw: bytes) -> tuple[str, str, bool, tuple[int, int] | None]:
    head = http_head.parse_head(raw)
    head.content_length()
    conn = head.headers.get("connection", "").lower()
    keep = conn != "close" and (head.version == "HTTP/1.1" or conn == "keep-alive")
    rng = head.headers.get("range")
    return head.method, head.target, keep, http_head.parse_range(rng, 1 << 30) if rng else None


def h11_parser() -> Callable[[bytes], object]:
    import h11

    conn = h11.Connection(h11.SERVER)
    response = h11.Response(status_code=206, headers=[("Content-Length", "512")])

    def parse(raw: bytes) -> object:
        conn.receive_data(raw)
        req = conn.next_event()
        assert isinstance(req, h11.Request), req
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        headers = {k: v for k, v in req.headers}
        rng = headers.get(b"range")
        parsed = http_head.parse_range(rng.decode("latin-1"), 1 << 30) if rng is not None else None
        # The state machine wants the response through it before the next request.
        conn.send(response)
        conn.send(h11.Data(data=b"x" * 512))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
        return req.method, req.target, conn.our_state, parsed

    return parse


def httptools_parser() -> Callable[[bytes], object] | None:
    try:
        import httptools
    except ImportError:
        return None

    class Protocol:
        def __init__(self) -> None:
            self.headers: dict[bytes, bytes] = {}
            self.url = b""
            self.done = False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.lower()] = value

        def on_message_complete(self) -> None:
            self.done = True

    proto = Protocol()
    parser = httptools.HttpRequestParser(proto)

    def parse(raw: bytes) -> object:
        proto.headers, proto.url, proto.done = {}, b"", False
        parser.feed_data(raw)
        assert proto.done
        rng = proto.headers.get(b"range")
        parsed = http_head.parse_range(rng.decode("latin-1"), 1 << 30) if rng is not None else None
        return parser.get_method(), proto.url, parser.should_keep_alive(), parsed

    return parse


def rate(parse: Callable[[bytes], object], rounds: int) -> float:
    """Requests parsed per second (best of three passes over ``rounds`` requests)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for i in range(rounds):
            parse(HEADS[i & 1])
        best = min(best, time.perf_counter() - started)
    return rounds / best


# Run in the range server's process: its head parser becomes httptools' (a Head alike).
HTTPTOOLS_SERVER = """
import httptools, sys
import services.stream.http_range as http_range
from shared.http_head import MAX_HEAD, BadRequest, Head, too_long

class _Head:
    __slots__ = ("headers", "url", "done")
    def __init__(self): self.headers, self.url, self.done = {}, b"", False
    def on_url(self, url): self.url += url
    def on_header(self, n, v): self.headers[n.decode("latin-1").lower()] = v.decode("latin-1")
    def on_message_complete(self): self.done = True

def parse_head(raw):
    if len(raw) > MAX_HEAD:
        raise too_long()
    h = _Head()
    p = httptools.HttpRequestParser(h)
    try:
        p.feed_data(raw)
    except httptools.HttpParserError as e:
        raise BadRequest(400, str(e)) from None
    return Head(p.get_method().decode(), h.url.decode("latin-1"),
                "HTTP/" + p.get_http_version(), h.headers)

http_range.parse_head = parse_head
from services.stream.standalone import main
sys.argv[0] = "standalone"
main()
"""
PLAIN_SERVER = "from services.stream.standalone import main; main()"
TOKEN = "bench-http"
IMAGE_SIZE = 64 << 20


def start_server(code: str, image: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(image), "--token", TOKEN, "--tls", "on"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"the range server did not start ({line})")
    return proc, int(line[2])


def sanboot_reads(port: int, n: int) -> float:
    """``n`` 512-byte Range GETs on one connection, one after another; seconds taken."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        started = time.perf_counter()
        for i in range(n):
            off = (i * 4096) % IMAGE_SIZE
            s.sendall(
                f"GET /s/{TOKEN} HTTP/1.1\r\nHost: x\r\nUser-Agent: iPXE/1.21.1\r\n"
                f"Range: bytes={off}-{off + 511}\r\n\r\n".encode()
            )
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert len(f.read(length)) == length == 512
        return time.perf_counter() - started


def serve_bench(requests: int, rounds: int) -> None:
    try:
        import httptools  # noqa: F401
    except ImportError:
        print("httptools: not installed, no whole-request figures")
        return
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        image = Path(tmp) / "image.raw"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        results: dict[str, list[tuple[float, float]]] = {"streamboot": [], "httptools": []}
        servers = {
            name: start_server(code, image)
            for name, code in (("streamboot", PLAIN_SERVER), ("httptools", HTTPTOOLS_SERVER))
        }
        try:
            sanboot_reads(servers["streamboot"][1], 200)  # warm both
            sanboot_reads(servers["httptools"][1], 200)
            for _ in range(rounds):  # alternated, so both see the same machine
                for name, (proc, port) in servers.items():
                    cpu = cpu_ms([proc.pid])
                    took = sanboot_reads(port, requests)
                    used = cpu_ms([proc.pid]) - cpu
                    results[name].append((requests / took, used * 1000 / requests))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)
    best = {name: max(r[0] for r in rs) for name, rs in results.items()}
    cpu_us = {name: min(r[1] for r in rs) for name, rs in results.items()}
    for name in results:
        print(
            f"range server, {name} parser: {best[name]:,.0f} requests/s (best of {rounds}), "
            f"{cpu_us[name]:.0f} us server CPU/request"
        )
    print(f"streamboot/httptools whole requests: {best['streamboot'] / best['httptools']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100_000)
    ap.add_argument("--serve", action="store_true", help="also time whole requests")
    ap.add_argument("--requests", type=int, default=5000, help="per round of --serve")
    ap.add_argument("--serve-rounds", type=int, default=5)
    args = ap.parse_args()
    base = rate(ours, args.rounds)
    print(f"streamboot (shared/http_head.py): {base:,.0f} requests/s")
    peers: list[tuple[str, Callable[[bytes], object] | None]] = [
        ("h11", h11_parser()),
        ("httptools", httptools_parser()),
    ]
    for name, parse in peers:
        if parse is None:
            print(f"{name}: not installed")
            continue
        r = rate(parse, args.rounds)
        print(f"{name}: {r:,.0f} requests/s; streamboot/{name} = {base / r:.2f}x")
    if args.serve:
        serve_bench(args.requests, args.serve_rounds)


if __name__ == "__main__":
    main()
