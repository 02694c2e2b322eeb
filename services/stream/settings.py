"""Settings of the stream data plane (a plain dataclass, so tests can build one directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.stream.nbd import tls
from shared.settings import Settings


@dataclass
class StreamSettings:
    bind_host: str = "127.0.0.1"
    nbd_port: int = 10809  # 0 = pick a free port
    http_port: int = 18081
    # 0: a free port, so the many servers tests and benches build by hand never collide on
    # it; the service takes STREAMBOOT_ISCSI_PORT (default 13260) through from_settings.
    iscsi_port: int = 0
    node_id: str = "stream"
    # Refuse a session's connections from any address but the one it was issued to
    # (ExportSpec.client_addr); off for NAT labs.
    client_address_check: bool = True
    # A connection with no request for this long (and none in flight) is closed; 0 = never.
    # Dead peers are normally found sooner by TCP keepalive / TCP_USER_TIMEOUT below.
    idle_timeout_s: float = 600.0
    # The handshake (NBD options, first HTTP request line, iSCSI login) must finish within this.
    handshake_timeout_s: float = 30.0
    # Connections one client address may hold in their handshake at once; past it new ones
    # are closed at once (shared/address_cap.py); 0 = no cap.
    max_handshakes_per_address: int = 256
    # ...and on the node from all addresses together: past it the oldest handshake is closed
    # to make room for the new one; 0 = half the descriptor limit, < 0 = no total.
    max_handshakes: int = 0
    # A client that does not read its replies for this long is dropped.
    stall_timeout_s: float = 60.0
    keepalive_idle_s: int = 30
    keepalive_interval_s: int = 10
    keepalive_count: int = 3
    # A session's state (its write cache) outlives its last connection this long, so a
    # client can reconnect (iPXE HTTP -> kernel NBD, multi-conn clients); 0 = drop at once.
    session_linger_s: float = 60.0
    # A session the registry announced (opened here before its client came) waits this long
    # for its first connection, then is dropped like a lingering one.
    announced_wait_s: float = 60.0
    # BlocksRequested batching.
    events_batch_extents: int = 512
    events_interval_s: float = 1.0
    write_cache_dir: Path | None = None
    # The vdisk dir: layers of the local store are read only from <vdisk_root>/<vdisk>/.
    vdisk_root: Path | None = None
    # NBD over our own socket transport, so large clean reads go out by sendfile
    # (services/stream/rawtransport.py); False = uvloop's transports (copies every reply).
    nbd_zero_copy: bool = True
    # ...once this many connections are open on the node (below: one preadv + sendmsg
    # copy). 1 = always: fio's libnbd client reads faster by sendfile at every size and
    # depth measured (128 KiB at queue depth 1: 1904 MiB/s against 1442; 1 MiB x 8: 4380
    # against 1195), and the boot trace's replay by one client is the same either way
    # once the node polls after requests (docs/stream.md).
    nbd_zero_copy_min_connections: int = 1
    # After a request the loop polls this long instead of sleeping, while fewer than
    # busy_poll.MAX_CONNECTIONS connections are open (services/stream/busy_poll.py); 0 = off.
    busy_poll_s: float = 200e-6
    # NBD over TLS (services/stream/nbd/tls.py): None = off.
    nbd_tls: tls.NbdTls | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> StreamSettings:
        return cls(
            bind_host=s.bind_host,
            nbd_port=s.nbd_port,
            http_port=s.http_stream_port,
            iscsi_port=s.iscsi_port,
            node_id=s.node_id,
            client_address_check=s.client_address_check,
            idle_timeout_s=s.session_idle_timeout_s,
            keepalive_idle_s=s.stream_keepalive_idle_s,
            keepalive_interval_s=s.stream_keepalive_interval_s,
            keepalive_count=s.stream_keepalive_count,
            session_linger_s=s.stream_session_linger_s,
            write_cache_dir=s.data_path("stream", "write-cache"),
            vdisk_root=s.vdisk_root,
            nbd_tls=tls.setup(
                s.stream_nbd_tls,
                s.stream_nbd_tls_cert,
                s.stream_nbd_tls_key,
                s.data_path("stream", "tls"),
                [s.advertised_host, s.bind_host],
                s.stream_nbd_tls_psk_file,
            ),
            **cls.tuning(s),
        )

    @staticmethod
    def tuning(s: Settings) -> dict[str, Any]:
        """The data plane's tuning from STREAMBOOT_*, for a server built by hand (the
        standalone server, the benches' test node) to take as the stream service does."""
        return {
            "nbd_zero_copy_min_connections": s.stream_nbd_zero_copy_min_connections,
            "busy_poll_s": s.stream_busy_poll_us / 1e6,
            "max_handshakes_per_address": s.stream_max_handshakes_per_address,
            "max_handshakes": s.stream_max_handshakes,
        }
