"""Settings for every streamboot process, read from the environment (prefix ``STREAMBOOT_``).

Every flag of every service is also an environment variable, so the same settings work
under ``streamboot up``, compose, Nomad or a plain ``python -m services.X``.
"""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.runtime_files import API_TOKEN_FILE as API_TOKEN_FILE
from shared.runtime_files import RUNTIME_FILE as RUNTIME_FILE
from shared.runtime_files import default_data_dir, runtime_info

# Secrets `streamboot up` generates (0600, in a 0700 folder of the data dir): a NATS
# password per role (file ``nats-<role>``, user name = role) and the PostgreSQL password.
SECRETS_DIR = "secrets"
POSTGRES_PASSWORD_FILE = "postgres"


def nats_password_file(data_dir: Path, role: str) -> Path:
    return Path(data_dir) / SECRETS_DIR / f"nats-{role}"


class Settings(BaseSettings):
    # An empty variable means "the default" (compose passes `${STREAMBOOT_X:-}` as "").
    model_config = SettingsConfigDict(
        env_prefix="STREAMBOOT_", extra="ignore", env_ignore_empty=True
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    # External servers; when unset, `streamboot up` starts embedded ones and passes their URLs.
    nats_url: str | None = None
    database_url: str | None = None
    # NATS credentials of this process (shared/bus_access.py: one user per role). Unset:
    # the password `up` generated for the process's role in DATA_DIR/secrets/nats-<role>.
    nats_user: str | None = None
    nats_password: str | None = None

    # Addresses: `bind_host` is where servers listen, `public_host` what clients are told.
    bind_host: str = "127.0.0.1"
    public_host: str | None = None
    node_id: str = Field(default_factory=socket.gethostname)

    # Default ports: unprivileged and away from the standard NATS (4222) / PostgreSQL (5432).
    nats_port: int = 14222
    postgres_port: int = 15433
    api_port: int = 18080
    http_stream_port: int = 18081
    nbd_port: int = 10809
    iscsi_port: int = 13260
    boot_http_port: int = 18082
    tftp_port: int = 16969
    dhcp_port: int = 16767
    # Prometheus `/metrics` of each service process (shared/metrics.py).
    metrics_port: int = 0
    # 0 = pick a free port (tests); > 0 as given.

    # Boot service. Real PXE needs tftp_port 69, dhcp_port 67, dhcp_pxe_port 4011 and an
    # interface; the defaults stay unprivileged and off the network.
    boot_files_dir: Path = Path("/usr/lib/ipxe")  # Debian `ipxe`: undionly.kpxe, ipxe.efi
    tftp_root: Path | None = None  # default: boot_files_dir
    tftp_timeout_s: float = 1.0
    tftp_retries: int = 5
    tftp_max_windowsize: int = 64
    tftp_max_client_timeout_s: int = 10  # a client's `timeout` option above this is ignored
    tftp_max_transfers_per_client: int = 4  # per client address
    # The boot HTTP server's URL as clients reach it, when that is not http://HOST:PORT of
    # this process: a TLS proxy in front of it (https://boot.lab; docs/security.md). The
    # scripts chain to it and DHCP hands it to iPXE.
    boot_http_public_url: str | None = None
    # Open boot HTTP connections per client address; past it new ones are closed (0 = no cap).
    boot_http_max_connections_per_address: int = 256
    # Boot HTTP connections waiting for a request head, all addresses together: past it the
    # oldest is closed to make room; 0 = half the descriptor limit, < 0 = no total.
    boot_http_max_waiting: int = 0
    tftp_client_requests_per_s: float = 10.0  # per client address, bursts of 3 s worth
    dhcp_mode: Literal["off", "proxy", "full"] = "off"
    dhcp_interface: str | None = None  # SO_BINDTODEVICE + broadcast; None: bind_host only
    dhcp_pxe_port: int = 14011  # proxy mode's second port (4011 for real)
    dhcp_client_port: int | None = None  # where broadcasts go; default dhcp_port + 1
    dhcp_server_ip: str | None = None  # default: the interface's address, else advertised
    dhcp_pool_start: str | None = None
    dhcp_pool_end: str | None = None
    dhcp_subnet_mask: str = "255.255.255.0"
    dhcp_router: str | None = None
    dhcp_dns: list[str] = Field(default_factory=list)
    dhcp_lease_s: int = 3600
    # Where full DHCP keeps its leases: "file" (DATA_DIR/boot/dhcp-leases.json, one boot
    # service per network) or "nats" (a KV bucket several boot services share, docs/failover.md).
    dhcp_lease_store: Literal["file", "nats"] = "file"
    dhcp_announce_per_s: float = 20.0  # BootRequested per second from PXE DISCOVERs (bursts: 5 s)
    # Wake-on-LAN (`streamboot device wake`, the console): the registry sends the magic
    # packet here, out of dhcp_interface when one is set (the clients' network).
    wol_address: str = "255.255.255.255"
    wol_port: int = 9
    boot_bios_file: str = "undionly.kpxe"
    boot_efi64_file: str = "ipxe.efi"
    ipxe_menu_timeout_s: int = 10
    # Answer IPv6 router solicitations with "nothing to configure" so iPXE does not wait
    # ~13 s for IPv6; default: on in full-DHCP mode, off in proxy mode.
    boot_ipv6_ra: bool | None = None

    # Embedded PostgreSQL (`streamboot up`): the OS user it runs as when started by root
    # (postgres refuses to run as root), and an explicit binaries folder (else auto-detected).
    postgres_user: str = "nobody"
    # Servers holding each JetStream stream and KV bucket streamboot creates: 3 when NATS
    # runs as a three-node cluster (compose.yaml), so losing one server loses no bucket.
    nats_replicas: int = Field(default=1, ge=1, le=5)
    # Where the embedded nats-server (`streamboot up`) listens: loopback unless set. An
    # IPv4 address of this machine (or 0.0.0.0) lets stream nodes on other hosts join
    # (docs/failover.md); the role passwords then cross that network in clear text.
    nats_listen_host: str | None = None
    # NATS HTTP monitoring (/varz, /jsz) of the embedded nats-server: off when unset.
    nats_monitor_port: int | None = None
    postgres_bin_dir: Path | None = None
    # Bearer token of the admin API; `streamboot up` generates it into DATA_DIR/api-token.
    api_token: str | None = None
    # The key that seals CHAP secrets in the event log (services/registry/sealing.py), or a
    # file holding it (a compose secret, a Nomad template in the task's secrets dir).
    sealing_key: str | None = None
    sealing_key_file: Path | None = None
    # The largest request body the admin API takes (413 past it); its bodies are small JSON.
    api_max_body_bytes: int = 1 << 20
    # Open admin API connections per client address; past it new ones are closed (0 = no cap).
    api_max_connections_per_address: int = 256
    # Admin API connections waiting for a request head, all addresses together: past it the
    # oldest is closed to make room; 0 = half the descriptor limit, < 0 = no total.
    api_max_waiting: int = 0
    # A request head not complete this long after the connection (or the last answer): 408.
    api_head_timeout_s: float = 10.0

    # Control plane timing.
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    session_idle_timeout_s: float = 600.0
    # Registry: a session whose client detached closes after this grace period with no
    # attachment (a PXE client leaves HTTP and comes back over NBD seconds later).
    session_detach_grace_s: float = 30.0
    # ... and this long while its boot hands an iSCSI disk from iPXE to the OS's own
    # initiator (boot methods sanboot-iscsi, iscsi-ibft) and the OS has not logged in yet:
    # iPXE never logs out, so its connection is found dead by keepalive while the OS may
    # still be loading (docs/iscsi.md, "The hand-off").
    session_handoff_grace_s: float = 300.0
    session_sweep_interval_s: float = 5.0
    # Registry back-pressure (docs/registry.md): past this many session opens waiting for
    # their commit, or once one has waited this long, an open is answered "busy, retry"
    # (no session) instead of being decided after its caller stopped waiting (5 s).
    registry_max_waiting_opens: int = Field(default=1024, ge=1)
    registry_open_max_wait_s: float = Field(default=2.0, gt=0)
    # The retry delay a busy answer suggests: drawn from 1 .. this many seconds, so refused
    # clients do not come back in one wave.
    registry_busy_retry_max_s: int = Field(default=3, ge=1)
    # A kernel-direct boot's nonce is redeemed, and its session's exports are used, only
    # from the address the boot service saw the client at; False for NAT labs, where every
    # client reaches the servers from one address (docs/security.md).
    client_address_check: bool = True
    # Registry: what to do with an unknown device that boots, and how to name it.
    unknown_device_policy: Literal["refuse", "auto-add"] = "refuse"
    auto_add_name_template: str = "lab-{n:03}"
    auto_add_collection: str | None = None
    # The local vdisk store (default DATA_DIR/vdisks); the importing CLI writes into it too.
    vdisk_dir: Path | None = None
    # Merge a vdisk's production chain into one base layer once it has more layers than
    # this (0: only `streamboot vdisk merge` merges); docs/registry.md.
    vdisk_auto_merge_layers: int = Field(default=0, ge=0)
    # A version reaches production only after the test stage (False: maintenance may be
    # promoted to production directly); docs/registry.md.
    vdisk_promotion_requires_test: bool = False

    # Cache service (services/cache): per-session write caches, shared read cache, profiles.
    # The stream keeps server-side write caches in the cache service (False: in process).
    stream_use_cache: bool = True
    # Dead clients (a powered-off machine leaves half-open connections) are found by TCP
    # keepalive after idle + interval * count seconds.
    stream_keepalive_idle_s: int = 30
    stream_keepalive_interval_s: int = 10
    stream_keepalive_count: int = 3
    # A session's state outlives its last connection this long (HTTP SAN -> NBD hand-off).
    stream_session_linger_s: float = 60.0
    # Large NBD reads go out by sendfile once this many connections are open on a stream
    # node, and are copied below that (docs/stream.md: "...and whatever the number of
    # clients").
    stream_nbd_zero_copy_min_connections: int = 1
    # A stream node with few connections polls this many microseconds after each request
    # instead of sleeping, so the next one is read without a wake-up (docs/stream.md).
    stream_busy_poll_us: int = 200
    # NBD over TLS (NBD_OPT_STARTTLS): off, on (clients may upgrade) or require (plain
    # clients refused; the kernel's nbd driver cannot do TLS: docs/security.md). The
    # operator's certificate and key, or (unset) a CA and certificate made under
    # DATA_DIR/stream/tls (clients trust its ca-cert.pem).
    # Connections one client address may hold before its session is attached (a host
    # opening sockets it never speaks on); past it they are closed at once; 0 = no cap.
    stream_max_handshakes_per_address: int = 256
    # The same from all addresses together: past it the oldest is closed to make room for
    # the new one (a real client's handshake takes milliseconds); 0 = half the descriptor
    # limit, < 0 = no total.
    stream_max_handshakes: int = 0
    stream_nbd_tls: Literal["off", "on", "require"] = "off"
    stream_nbd_tls_cert: Path | None = None
    stream_nbd_tls_key: Path | None = None
    # Pre-shared keys clients may use instead of the certificate (psktool's name:hexkey lines).
    stream_nbd_tls_psk_file: Path | None = None
    # A session's writes, its open and its reads through the cache service wait this long
    # for a cache node that does not answer (restarting, stopped, NATS away) before they
    # fail with EIO (an open: the client is refused); once it answers they go on.
    stream_cache_outage_grace_s: float = 30.0
    cache_write_capacity: int = 8 << 30  # bytes one session's write cache may hold
    # A write cache unused this long, every change fsynced, has its two files' descriptors
    # closed (the next write or read reopens them): idle sessions hold no descriptor on a
    # cache node; 0 = keep them open until the session closes.
    cache_write_idle_close_s: float = 60.0
    cache_read_capacity: int = 4 << 30  # bytes of the shared read cache, all versions
    # A version's read cache that changed and then was quiet this long is fsynced and
    # marked durable, so a machine restart (not only a clean stop) finds it warm; 0 = only
    # at a clean stop (services/cache/read_cache.py, VersionCache).
    cache_read_checkpoint_s: float = 10.0
    # A cache node with less free space than this (its disk for server-disk caches, its RAM
    # dir for server-ram) gets no new write cache while another live node has room.
    cache_min_free_bytes: int = 2 << 30
    cache_ram_dir: Path | None = None  # server-ram write caches (default: a /dev/shm folder)
    # Non-local vdisk stores by name, e.g. {"ftp": "ftp://user:pw@host:21/vdisks",
    # "san": "blockdev:///"}; "local" is always the vdisk dir.
    cache_stores: dict[str, str] = Field(default_factory=dict)
    boot_profile_window_s: float = 60.0
    boot_profile_max_boots: int = 10

    # Telemetry: where spans go.
    trace_exporter: Literal["none", "otlp", "jsonl"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    trace_file: Path | None = None

    log_level: str = "INFO"

    @cached_property
    def advertised_host(self) -> str:
        return self.public_host or self.bind_host

    @property
    def vdisk_root(self) -> Path:
        return (self.vdisk_dir or self.data_dir / "vdisks").absolute()

    def data_path(self, *parts: str) -> Path:
        return self.data_dir.joinpath(*parts)

    def require_nats_url(self) -> str:
        return self.nats_url or runtime_info(self.data_dir).get(
            "nats_url", f"nats://127.0.0.1:{self.nats_port}"
        )

    def nats_credentials(self, role: str) -> tuple[str, str] | None:
        """(user, password) on NATS for a process of ``role``: the settings' own, else
        None when the URL carries some (nats-py uses those), else the role's password in
        the data dir; None when there is none (anonymous)."""
        if self.nats_user:
            return self.nats_user, self.nats_password or ""
        if self.nats_url and urlsplit(self.nats_url.split(",")[0].strip()).username:
            return None
        try:
            return role, nats_password_file(self.data_dir, role).read_text().strip()
        except (FileNotFoundError, PermissionError):
            return None

    def require_database_url(self) -> str:
        """STREAMBOOT_DATABASE_URL, else the embedded one of the running `up` (runtime.json
        holds it without its password, which is in DATA_DIR/secrets/postgres)."""
        if self.database_url:
            return self.database_url
        url = runtime_info(self.data_dir).get("database_url")
        if not url:
            raise RuntimeError(
                "no database: set STREAMBOOT_DATABASE_URL or start the system with `streamboot up`"
            )
        try:
            password = (self.data_dir / SECRETS_DIR / POSTGRES_PASSWORD_FILE).read_text().strip()
        except FileNotFoundError:
            return url
        return url_with_password(url, password)


def url_with_password(url: str, password: str) -> str:
    """``url`` (``scheme://user@host...``) with ``password`` in it."""
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def without_password(url: str) -> str:
    """``url`` as it may be printed, logged or written to runtime.json: any password in it
    left out (a comma-separated list of URLs, as NATS seeds are given, each)."""

    def one(u: str) -> str:
        parts = urlsplit(u.strip())
        if parts.password is None:
            return u
        userinfo, _, host = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}@{host}"))

    return ",".join(one(u) for u in url.split(","))
