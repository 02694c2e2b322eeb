"""A running client's node-list refresh (docs/failover.md): the boot service's
``GET /failover-nodes``, asked with real curl and with the client's own helper
(``streamboot-nbd -L``), against the real boot service and registry on real NATS and
PostgreSQL, with stream nodes' heartbeats put in the bucket as a stream node puts them.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import bus
from shared.endpoints import endpoint_ok, host_port
from shared.heartbeat import Heartbeat
from streamboot.client_package import build_nbd_helper
from tests.boot.test_service import Boot, boot, curl, seed  # noqa: F401  (boot: the fixture)
from tests.registry.conftest import Registry, data_dir, nc, registry  # noqa: F401

pytestmark = pytest.mark.timeout(120)
MAC = "52:54:00:24:00:01"
NODE_A, NODE_B = "127.0.0.1:21001", "127.0.0.1:21002"


NODE_V6 = "[::1]:21003"  # a node whose advertised address is IPv6 (shared/endpoints.py)


def beat(js: Any, node: str, nbd: str, load: int) -> Heartbeat:
    return Heartbeat(js, "stream", node, 1.0, lambda: {
        "load": load, "nbd": nbd, "http_stream": f"http://{nbd.rpartition(':')[0]}:1"})  # fmt: skip


async def ask(service: Boot, token: str | None, *extra: str) -> tuple[int, str]:
    """GET /failover-nodes with real curl: the status and the body."""
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    done = await curl("-i", *auth, *extra, f"{service.url}/failover-nodes")
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition("\n\n")
    return int(head.split()[1]), body


async def open_session(bus_client: Any) -> dict[str, Any]:
    """A session as a kernel-direct boot opens it: its exports accept 127.0.0.1 only."""
    return await bus.request_json(
        bus_client, "streamboot.registry.session.open", {"mac": MAC, "client_addr": "127.0.0.1"}
    )


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    out = tmp_path_factory.mktemp("helper") / "streamboot-nbd"
    build_nbd_helper(out)
    return out


async def run_helper(helper: Path, server: str, token: str, *nodes: str) -> tuple[int, str, str]:
    """``streamboot-nbd -L``: its exit code, the list it ends with, what it said."""
    done = await asyncio.to_thread(
        subprocess.run, [str(helper), "-L", "-s", server, "-N", token, *nodes],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.returncode, done.stdout.strip(), done.stderr


async def test_the_boot_service_names_the_live_nodes_to_the_sessions_client(
    boot: Boot,  # noqa: F811
    registry: Registry,  # noqa: F811
    nc: Any,  # noqa: F811
    helper: Path,
) -> None:
    await seed(registry, registry.data_dir, MAC, "linux")
    js = nc.jetstream()
    a = beat(js, "refresh-a", NODE_A, 5)
    await a.beat()
    await registry.sees("stream", "refresh-a")
    s = await open_session(nc)
    assert s["nbd_nodes"] == []  # the hand-off knew of no other node
    # A node that comes up after the hand-off, and a forged heartbeat (any service may
    # write the bucket) whose endpoint is no host:port.
    b = beat(js, "refresh-b", NODE_B, 0)
    v6 = beat(js, "refresh-v6", NODE_V6, 1)
    forged = beat(js, "refresh-forged", "evil;host:1\nnbd_nodes=x", 0)
    forged_v6 = beat(js, "refresh-forged-v6", "[::1%lo]:1", 0)  # a zone is the server's
    try:
        for late in (b, v6, forged, forged_v6):
            await late.beat()
            await registry.sees("stream", late.node_id)
        status, body = await ask(boot, s["token"])
        # Least loaded first; the IPv6 node in brackets, as the helper dials it.
        assert (status, body) == (200, f"nbd_nodes={NODE_B},{NODE_V6},{NODE_A}\n")
        # The client's helper puts the answer's nodes first, in its order, then the known
        # ones it did not name.
        got = await run_helper(helper, boot.url, s["token"], "10.9.9.9:10809", NODE_A)
        assert got[:2] == (0, f"nodes: {NODE_B} {NODE_V6} {NODE_A} 10.9.9.9:10809"), got
        got = await run_helper(helper, boot.url, "x" * 43, NODE_A)
        assert got[:2] == (1, f"nodes: {NODE_A}") and "HTTP 404" in got[2], got

        # Only to the session's own address, only with its token, only while it lives.
        assert await ask(boot, s["token"], "--interface", "127.0.0.2") == (
            403, "wrong client address\n",
        )  # fmt: skip
        unknown = (404, "session unknown\n")
        assert await ask(boot, None) == unknown
        assert await ask(boot, "x" * 43) == unknown
        assert await ask(boot, s["token"] + "%0d") == unknown
        done = await curl("-i", "-H", f"Authorization: Basic {s['token']}",
                          f"{boot.url}/failover-nodes")  # fmt: skip
        assert done.stdout.startswith("HTTP/1.1 404"), done.stdout
        post = await curl("-i", "-X", "POST", "-H", f"Authorization: Bearer {s['token']}",
                          f"{boot.url}/failover-nodes")  # fmt: skip
        assert post.stdout.startswith("HTTP/1.1 405"), post.stdout
        await bus.request_json(nc, "streamboot.registry.session.close", {"token": s["token"]})
        assert await ask(boot, s["token"]) == unknown
    finally:
        for hb in (a, b, v6, forged, forged_v6):
            await hb.stop()


async def test_a_stranger_guessing_tokens_is_slowed_down(boot: Boot) -> None:  # noqa: F811
    statuses = [(await ask(boot, f"guess{i:040d}", "--interface", "127.0.0.3"))[0]
                for i in range(20)]  # fmt: skip
    assert statuses[0] == 404 and 429 in statuses, statuses


@pytest.fixture(params=["127.0.0.1"])
def hostile(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP server that answers every connection with the next canned bytes: what a
    broken or hostile boot service could send the helper (on ``::1`` when parametrized
    so: the helper's URL then has an IPv6 address)."""
    answers: list[bytes] = []
    host = request.param
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.create_server((host, 0), family=family)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(answers.pop(0) if answers else b"")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://{host_port(host, srv.getsockname()[1])}", answers
    finally:
        stop.set()
        thread.join(5)
        srv.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed at once
        b"HTTP/1.1 200 OK\r\n\r\nnbd_nodes=" + b"a" * 5000 + b":1\n",  # past the bound
        b"HTTP/1.1 200 OK\r\n\r\nnbd_nodes=evil;host:1,h:0,h:99999,h:1x,:5,h:\n",
        b"HTTP/1.1 200 OK\r\n\r\nnbd_nodes=[::1:5,[zz::1]:5,[::1]5,[]:5,[::1]:0,::1:5\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://10.6.6.6/\r\n\r\nnbd_nodes=10.6.6.6:1\n",
        b"\x00\xff garbage",
        b"HTTP/1.1 200 OK\r\n\r\nno list here\n",
    ],
)
async def test_the_helper_keeps_its_list_when_the_answer_is_bad(
    hostile: tuple[str, list[bytes]], helper: Path, answer: bytes
) -> None:
    url, answers = hostile
    answers.append(answer)
    got = await run_helper(helper, url, "t" * 43, NODE_A)
    assert got[:2] == (1, f"nodes: {NODE_A}"), got


@pytest.mark.parametrize("hostile", ["127.0.0.1", "::1"], indirect=True)
async def test_the_helper_takes_what_is_valid_of_an_answer(
    hostile: tuple[str, list[bytes]], helper: Path
) -> None:
    """Also from a boot service it reaches over IPv6, and IPv6 nodes in the answer."""
    url, answers = hostile
    answers.append(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
        b"other=1\nnbd_nodes=10.1.1.1:10809,bad;one:1,[fd00::2]:10809," + NODE_A.encode() + b"\n"
    )
    got = await run_helper(helper, url, "t" * 43, NODE_A, "[fd00::9]:10809")
    assert got[:2] == (0, f"nodes: 10.1.1.1:10809 [fd00::2]:10809 {NODE_A} [fd00::9]:10809"), got


def test_a_boot_service_that_never_answers_leaves_the_list(helper: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = subprocess.run(
            [str(helper), "-L", "-s", url, "-N", "t" * 43, NODE_A],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (1, f"nodes: {NODE_A}"), done.stderr


def test_endpoints_are_written_and_checked_as_the_helper_dials_them() -> None:
    """What a stream node advertises (host_port) is what the boot service hands out
    (endpoint_ok); an IPv6 address has its brackets, a zone or anything else does not pass."""
    assert host_port("10.0.0.1", 10809) == "10.0.0.1:10809"
    assert host_port("fd00::2", 10809) == "[fd00::2]:10809"
    good = ["10.0.0.1:10809", "node-1.lab:1", "[fd00::2]:10809", "[::1]:65535", host_port("::", 9)]
    bad = ["fd00::2:10809", "[fd00::2]", "[fd00::2]:0", "[fe80::1%eth0]:1", "[zz::1]:1",
           "[10.0.0.1]:1", "-x:1", "h:65536", "h:1x", ":1", "evil;host:1", "[]:1"]  # fmt: skip
    assert [e for e in good if not endpoint_ok(e)] == []
    assert [e for e in bad if endpoint_ok(e)] == []
