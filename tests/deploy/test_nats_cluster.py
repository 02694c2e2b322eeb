"""The three-node NATS cluster of docs/deploy.md, validated: streamboot's bus client given
ONE node's URL fails over to another member when that node is killed -9, request/reply
goes on, and a KV bucket with three replicas keeps its values (docs/failover.md).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions
from nats.aio.msg import Msg

from shared import bus
from shared.bus import HEARTBEAT_BUCKET
from shared.bus_access import ROLES
from shared.heartbeat import heartbeat_bucket
from streamboot.embedded.nats import nats_server_binary
from streamboot.embedded.proc import free_port
from tests.deploy.test_deploy_files import NOMAD_FILE

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


# --- the Nomad job's NATS group, rendered as Nomad would and run -----------------------

PASSWORDS = {role: f"nats-pw-{role}" for role in ROLES}


def render(template: str, env: dict[str, str], services: dict[str, list[str]]) -> str:
    """The Nomad template constructs the job uses, rendered for one allocation: ``env``
    its task environment, ``services`` the "address:port" of each Nomad service now, the
    Nomad variables the test's passwords. Any other construct fails the test (then this
    stand-in for Nomad's template engine must learn it)."""

    def joined(m: re.Match[str]) -> str:  # {{ if $i }},{{ end }} between the items
        body = m.group(2).replace("{{ $s.Address }}:{{ $s.Port }}", "{}")
        return ",".join(body.format(a) for a in services.get(m.group(1), []))

    def each(m: re.Match[str]) -> str:
        body = m.group(2).replace("{{ .Address }}:{{ .Port }}", "{}")
        return "".join(body.format(a) for a in services.get(m.group(1), []))

    text = template.replace('\\"', '"')
    text = re.sub(r'\{\{ with nomadVar "nomad/jobs/streamboot" -\}\}\s*', "", text)
    text = re.sub(r"\s*\{\{- end \}\}", "", text)
    text = re.sub(r"\{\{ \.nats_password_(\w+) \}\}", lambda m: PASSWORDS[m.group(1)], text)
    text = re.sub(r'\{\{ env "(\w+)" \}\}', lambda m: env[m.group(1)], text)
    service = r'nomadService "([\w-]+)" \}\}'
    text = re.sub(
        r"\{\{ range \$i, \$s := " + service + r"\{\{ if \$i \}\},\{\{ end \}\}(.*?)\{\{ end \}\}",
        joined, text, flags=re.S,
    )  # fmt: skip
    text = re.sub(r"\{\{ range " + service + r"(.*?)\{\{ end \}\}", each, text, flags=re.S)
    assert "{{" not in text and "${" not in text.replace("$$", ""), text
    return text


def start_server(conf: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )


def nomad_job() -> dict[str, Any]:
    options = SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True,
        preserve_heredocs=False,
    )  # fmt: skip
    with NOMAD_FILE.open() as f:
        return hcl2.load(f, serialization_options=options)


async def test_the_nomad_jobs_nats_group_forms_one_cluster_as_its_members_appear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's NATS template for three allocations, each started seeing only the members
    Nomad listed before it (the first: none), the earlier ones rendered again once all are
    listed and told with SIGHUP (the template's change_mode): one JetStream cluster of
    three, where the services' STREAMBOOT_NATS_URL (the job's bus_env rendered) reaches it
    and a bucket made with the job's STREAMBOOT_NATS_REPLICAS has that many replicas."""
    job = nomad_job()
    (spec,) = job["job"]
    groups = {k: v for g in spec["streamboot"]["group"] for k, v in g.items()}
    (task,) = [t["nats"] for t in groups["nats"]["task"] if "nats" in t]
    (template,) = task["template"]
    assert (template["change_mode"], template["change_signal"]) == ("signal", "SIGHUP")
    count = next(v["nats_count"] for v in job["variable"] if "nats_count" in v)["default"]
    assert count == 3
    ports = [(free_port(), free_port(), free_port()) for _ in range(count)]
    members = [f"127.0.0.1:{route}" for _, route, _ in ports]

    def conf(i: int, known: list[str]) -> Path:
        client, route, monitor = ports[i]
        env = {"NOMAD_ALLOC_INDEX": str(i), "NOMAD_ADDR_client": f"127.0.0.1:{client}",
               "NOMAD_ADDR_cluster": members[i]}  # fmt: skip
        text = render(template["data"], env, {"streamboot-nats-cluster": known})
        # One machine: each member's own ports where a container has the fixed ones.
        text = text.replace("0.0.0.0:4222", f"127.0.0.1:{client}")
        text = text.replace("0.0.0.0:6222", f"127.0.0.1:{route}")
        text = text.replace("0.0.0.0:8222", f"127.0.0.1:{monitor}")
        text = text.replace("/data/jetstream", str(tmp_path / f"js-{i}"))
        path = tmp_path / f"nats-{i}.conf"
        path.write_text(text)
        return path

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            procs.append(start_server(conf(i, members[:i]), tmp_path / f"nats-{i}.log"))
            await asyncio.sleep(0.5)
            assert procs[-1].poll() is None, (tmp_path / f"nats-{i}.log").read_text()
        for i in range(count - 1):  # Nomad renders again as the others register
            conf(i, members)
            procs[i].send_signal(signal.SIGHUP)

        async def reloaded() -> None:
            # A login while a member reloads its authorization can be refused.
            for i in range(count - 1):
                log = (tmp_path / f"nats-{i}.log").read_text()
                assert "Reloaded server configuration" in log, f"member {i} not yet"

        await until("the members reloaded their configuration", reloaded, 30)

        locals_ = {k: v for block in job["locals"] for k, v in block.items()}
        bus_env = render(
            locals_["bus_env"].replace("${var.nats_count}", str(count)), {},
            {"streamboot-nats": [f"127.0.0.1:{c}" for c, _, _ in ports]},
        )  # fmt: skip
        env = dict(line.split("=", 1) for line in bus_env.split() if "=" in line)
        assert env["STREAMBOOT_NATS_REPLICAS"] == "3"
        monkeypatch.setenv("STREAMBOOT_NATS_REPLICAS", env["STREAMBOOT_NATS_REPLICAS"])
        client = await bus.connect(
            env["STREAMBOOT_NATS_URL"], "nomad-cluster-test",
            credentials=("registry", PASSWORDS["registry"]), connect_timeout_s=30,
        )  # fmt: skip
        try:
            js = client.jetstream()
            kv = await until("a bucket with 3 replicas", lambda: heartbeat_bucket(js))
            info = await js.stream_info(f"KV_{HEARTBEAT_BUCKET}")
            assert info.config.num_replicas == 3
            assert sorted([info.cluster.leader, *(r.name for r in info.cluster.replicas)]) == [
                f"streamboot-nats-{i}" for i in range(count)
            ]
            await kv.put("held", b"by three")
            assert (await kv.get("held")).value == b"by three"
        finally:
            await client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
