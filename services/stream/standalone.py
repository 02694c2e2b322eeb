"""Serve one vdisk chain under fixed tokens, without NATS: for benchmarks and debugging.

    python -m services.stream.standalone --token T --nbd-port 10809 base.raw [v2.map ...]

Prints ``READY <nbd_port> <http_port> <iscsi_port>`` once listening (the iSCSI target of a
token is ``iqn.2026-12.io.streamboot:<token>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from services.stream.nbd import tls
from services.stream.server import StreamServers
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import Event
from shared.settings import Settings
from shared.vdisk_layout import open_chain


@dataclass
class StaticResolver:
    """A fixed token -> export table (this server, and the tests that serve fixed exports)."""

    exports: dict[str, ExportSpec] = field(default_factory=dict)

    async def resolve(self, token: str) -> ExportSpec | None:
        return self.exports.get(token)


class NullSink:
    """Events go nowhere: this server has no bus."""

    async def emit(self, event: Event, correlation_id: str | None) -> None:
        return None


async def serve(args: argparse.Namespace) -> None:
    layers = tuple(Path(p) for p in args.layers)
    with open_chain(layers) as chain:
        size = chain.size
    # --sessions N: tokens TOKEN-0 .. TOKEN-(N-1), each its own session and write cache.
    tokens = (
        [args.token] if args.sessions <= 1 else [f"{args.token}-{i}" for i in range(args.sessions)]
    )
    specs = {
        t: ExportSpec(
            session_id=t,
            vdisk="standalone",
            version=len(layers),
            layers=layers,
            size=size,
            write_cache=args.write_cache,
        )
        for t in tokens
    }
    settings = StreamSettings(
        nbd_port=args.nbd_port,
        http_port=args.http_port,
        iscsi_port=args.iscsi_port,
        session_linger_s=args.linger,
        nbd_zero_copy=not args.no_zero_copy,
        nbd_tls=tls.setup(args.tls, None, None, args.tls_dir, ["127.0.0.1"], args.tls_psk_file)
        if args.tls_dir
        else None,
        **StreamSettings.tuning(Settings()),
    )
    servers = StreamServers(StaticResolver(specs), NullSink(), settings)
    await servers.start()
    print(f"READY {servers.nbd_port} {servers.http_port} {servers.iscsi_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await servers.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("layers", nargs="+", help="base image, then delta .map files")
    ap.add_argument("--token", default="standalone")
    ap.add_argument("--sessions", type=int, default=1, help="N sessions: TOKEN-0 .. TOKEN-N-1")
    ap.add_argument("--nbd-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--iscsi-port", type=int, default=0)
    ap.add_argument("--linger", type=float, default=3600.0)
    ap.add_argument("--tls", default="require", choices=["on", "require"])
    ap.add_argument("--tls-dir", type=Path, help="NBD over TLS: credentials made here")
    ap.add_argument("--tls-psk-file", type=Path, help="with --tls-dir: psktool's keys too")
    ap.add_argument("--no-zero-copy", action="store_true", help="uvloop transports, no sendfile")
    ap.add_argument(
        "--write-cache",
        default="server-ram",
        choices=["server-ram", "server-disk", "client-ram", "client-disk"],
    )
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
