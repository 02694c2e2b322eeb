"""The three-node NATS cluster of docs/deploy.md, validated: streamboot's bus client given
ONE node's URL fails over to another member when that node is killed -9, request/reply
goes on, and a KV bucket with three replicas keeps its values (docs/failover.md).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from shared import bus
from streamboot.embedded.nats import nats_server_binary
from streamboot.embedded.proc import free_port

pytestmark = pytest.mark.timeout(180)

# docs/deploy.md's node configuration, on one machine: its own ports per node.
CONFIG = """server_name: nats-{i}
listen: 127.0.0.1:{client}
max_payload: 8MB
jetstream {{ store_dir: "{store}" }}
cluster {{
  name: streamboot
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """Three nats-servers in one cluster: (process, client URL) each."""
    clients, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    route_urls = ", ".join(f"nats://127.0.0.1:{r}" for r in routes)
    nodes = []
    for i in range(3):
        conf = tmp_path / f"nats-{i}.conf"
        conf.write_text(CONFIG.format(i=i, client=clients[i], route=routes[i],
                                      store=tmp_path / f"js-{i}", routes=route_urls))  # fmt: skip
        log = open(tmp_path / f"nats-{i}.log", "wb")
        proc = subprocess.Popen([str(nats_server_binary()), "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        nodes.append((proc, f"nats://127.0.0.1:{clients[i]}"))
    try:
        yield nodes
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


async def until(what: str, attempt, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    """``await attempt()`` until it stops raising (the cluster electing, the client moving)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{what}: still {exc!r}") from exc
            await asyncio.sleep(0.5)


async def test_a_client_given_one_node_survives_its_kill(
    cluster: list[tuple[subprocess.Popen[bytes], str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What compose.yaml sets beside its three NATS servers: the buckets streamboot creates
    # get three replicas (shared/bus.py, key_value_bucket).
    monkeypatch.setenv("STREAMBOOT_NATS_REPLICAS", "3")
    (first, first_url), (_, second_url), _ = cluster
    client = await bus.connect(first_url, "cluster-test-client", connect_timeout_s=30)
    responder = await bus.connect(second_url, "cluster-test-responder", connect_timeout_s=30)
    try:

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("cluster.echo", cb=echo)
        await responder.flush()
        js = client.jetstream()
        kv = await until(
            "a KV bucket with 3 replicas",
            lambda: bus.key_value_bucket(js, "cluster_test", None),
        )
        info = await js.stream_info("KV_cluster_test")
        assert info.config.num_replicas == 3
        await kv.put("held", b"by three nodes")
        assert (await client.request("cluster.echo", b"one", timeout=5)).data == b"one"

        first.kill()  # -9: no goodbye to the clients
        first.wait(10)

        reply = await until(
            "request/reply after the kill",
            lambda: client.request("cluster.echo", b"two", timeout=2),
        )
        assert reply.data == b"two"
        assert client.connected_url is not None
        assert client.connected_url.port != int(first_url.rsplit(":", 1)[1])
        entry = await until("the KV value after the kill", lambda: kv.get("held"))
        assert entry.value == b"by three nodes"
    finally:
        await client.close()
        await responder.close()
