"""The boot service process: HTTP for iPXE, the boot files and the hand-off, TFTP, and DHCP when enabled.

Started by ``python -m services.boot`` (see :func:`shared.service.run_service`); its
endpoints go into the heartbeat (``tftp``, ``dhcp``, ``boot_http``) for ``streamboot status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from services.boot.boot_http import BootHttp
from services.boot.boot_trace import BootTraces, boot_span, record_boot_span
from services.boot.client_addresses import ClientAddresses
from services.boot.dhcp_leases import LeaseStore
from services.boot.dhcp_server import (
    DhcpConfig,
    DhcpResponder,
    DhcpServer,
    PxeClient,
    interface_address,
    open_socket,
)
from services.boot.handoff_store import HandoffStore
from services.boot.http_server import HttpServer
from services.boot.ipv6_ra import answer_solicitations
from services.boot.shared_leases import SharedLeases
from services.boot.tftp_server import TftpConfig, TftpServer, Transfer
from shared.bus import BusError
from shared.contracts.boot import leases_path
from shared.contracts.registry import RegistryClient
from shared.event_sink import QueuedEventSink
from shared.events import BootRequested, Event
from shared.service import ServiceRuntime
from shared.settings import Settings

log = logging.getLogger("streamboot.boot")

# How long a PXE DISCOVER's BootRequested waits for the registry to name the vdisk.
LOOKUP_WAIT_S = 1.0
# Full DHCP with shared leases answers nobody before it holds the bucket's records.
SHARED_LEASES_SYNC_S = 30.0


def prepare_tftp_root(s: Settings) -> Path:
    """The folder TFTP serves: ``tftp_root`` as it is when set; else DATA_DIR/boot/tftp with
    copies of the iPXE builds from ``boot_files_dir``. Copies, because Debian's
    /usr/lib/ipxe/ipxe.efi is a symlink to /boot, which the server rightly refuses to follow
    out of its root; the copies are refreshed when the package's files change."""
    if s.tftp_root is not None:
        return s.tftp_root
    root = s.data_path("boot", "tftp").absolute()
    root.mkdir(parents=True, exist_ok=True)
    for name in (s.boot_bios_file, s.boot_efi64_file):
        source, target = s.boot_files_dir / name, root / name
        try:
            st = source.stat()
        except FileNotFoundError:
            log.warning("boot file %s is missing (apt-get install ipxe, or set "
                        "STREAMBOOT_BOOT_FILES_DIR)", source)  # fmt: skip
            continue
        with contextlib.suppress(FileNotFoundError):
            if (t := target.stat()).st_size == st.st_size and t.st_mtime == st.st_mtime:
                continue
        tmp = root / f".{name}.tmp"
        shutil.copy2(source, tmp)  # follows the symlink; keeps the mtime for the check above
        os.replace(tmp, target)
    return root


class Emitter:
    """Hands events to the queued sink at once, from synchronous code (a DHCP packet
    handler must not wait on the bus): the sink retries until the log has them."""

    def __init__(self, sink: QueuedEventSink) -> None:
        self.sink = sink
        self._pending: set[asyncio.Future[Any]] = set()

    def __call__(self, event: Event) -> None:
        self.soon(self.sink.emit(event, None))

    def soon(self, work: Coroutine[Any, Any, None]) -> None:
        """Start ``work`` now (it ends by emitting); drained like the events themselves."""
        future = asyncio.ensure_future(work)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.sink.drain()


async def start(rt: ServiceRuntime) -> None:
    s = rt.settings
    sink = QueuedEventSink(rt.events)
    emit = Emitter(sink)
    # Not an rt.spawn task: those are cancelled before the stop hooks run, and the queued
    # events must still reach the log after the servers stopped (the first hook runs last).
    sink_task = asyncio.ensure_future(sink.run())

    async def stop_events() -> None:
        await emit.drain()
        sink_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sink_task

    rt.on_stop(stop_events)

    # HTTP first: DHCP tells iPXE clients its URL.
    handoffs = await HandoffStore.open(rt.js)
    traces = await BootTraces.open(rt.js)
    registry = RegistryClient(rt.nc)
    app = BootHttp(
        registry,
        handoffs,
        emit,
        traces=traces,
        base_url="",  # set below once the port is known
        menu_timeout_s=s.ipxe_menu_timeout_s,
        boot_files_root=s.vdisk_root,
        check_client_address=s.client_address_check,
    )
    http = HttpServer(
        app,
        s.bind_host,
        s.boot_http_port,
        s.boot_http_max_connections_per_address,
        s.boot_http_max_waiting,
    )
    await http.start()
    rt.on_stop(http.stop)
    app.base_url = (s.boot_http_public_url or f"http://{s.advertised_host}:{http.port}").rstrip("/")
    rt.vitals["boot_http"] = app.base_url

    root = prepare_tftp_root(s)
    addresses = ClientAddresses()

    def on_transfer(transfer: Transfer, error: str | None) -> None:
        emit.soon(trace_tftp_transfer(transfer, error, addresses, traces))

    tftp = TftpServer(
        TftpConfig(
            root=root,
            timeout_s=s.tftp_timeout_s,
            retries=s.tftp_retries,
            max_windowsize=s.tftp_max_windowsize,
            max_client_timeout_s=s.tftp_max_client_timeout_s,
            max_transfers_per_client=s.tftp_max_transfers_per_client,
            client_requests_per_s=s.tftp_client_requests_per_s,
        ),
        s.bind_host,
        s.tftp_port,
        on_transfer,
    )
    await tftp.start()
    rt.on_stop(tftp.stop)
    rt.vitals["tftp"] = f"{s.advertised_host}:{tftp.port}"
    rt.vitals["tftp_stats"] = tftp.stats

    rt.vitals["dhcp"] = "off"
    if s.dhcp_mode != "off":
        if tftp.port != 69:
            log.warning(
                "DHCP is on but TFTP listens on port %d: PXE firmware only uses 69", tftp.port
            )
        dhcp = await start_dhcp(
            rt, f"{app.base_url}/ipxe/boot.ipxe", emit, registry, traces, addresses
        )
        rt.on_stop(dhcp.stop)
        rt.vitals["dhcp"] = f"{dhcp.responder.config.server_ip}:{s.dhcp_port}"
        rt.vitals["dhcp_mode"] = s.dhcp_mode
        rt.vitals["dhcp_stats"] = dhcp.responder.stats
        answer_ra = s.boot_ipv6_ra if s.boot_ipv6_ra is not None else s.dhcp_mode == "full"
        if answer_ra and s.dhcp_interface:
            rt.spawn(answer_solicitations(s.dhcp_interface), "ipv6-ra")


async def announce_boot(
    client: PxeClient, registry: RegistryClient, emit: Emitter, traces: BootTraces
) -> None:
    """BootRequested for a PXE DISCOVER, with the vdisk (and version) the device will most
    likely boot, so the cache can warm that version's boot profile; the registry gets a
    short moment to say which, and the event goes out without it otherwise. The DISCOVER
    begins the boot's trace: the event carries it to the cache (prefetch) and the log."""
    seen_ns = time.time_ns()
    boot = await traces.begin(client.mac, seen_ns)
    with boot_span("dhcp", boot, start_ns=seen_ns, mac=client.mac, arch=client.arch) as span:
        vdisk = version = None
        try:
            with boot_span("assignment lookup", boot, mac=client.mac):
                device = await asyncio.wait_for(
                    registry.lookup(client.mac, client.uuid), LOOKUP_WAIT_S
                )
            vdisk, version = device.likely_boot
        except (BusError, TimeoutError) as exc:
            log.info("boot of %s announced without a vdisk: %s", client.mac, exc)
        span.set_attribute("streamboot.vdisk", vdisk or "")
        await emit.sink.emit(
            BootRequested(
                mac=client.mac,
                smbios_uuid=client.uuid,
                arch=client.arch,
                vdisk=vdisk,
                version=version,
            ),
            None,
        )


async def trace_tftp_transfer(
    transfer: Transfer, error: str | None, addresses: ClientAddresses, traces: BootTraces
) -> None:
    """The transfer as a span of its client's boot, when the client is a known boot in
    progress (a TFTP request names no MAC: DHCP or the neighbour table does)."""
    mac = addresses.mac_of(transfer.peer[0])
    boot = await traces.peek(mac) if mac else None
    if boot is None:
        return
    record_boot_span(
        f"tftp {transfer.request.filename}",
        boot,
        transfer.started_ns,
        transfer.ended_ns,
        mac=mac,
        client=transfer.peer[0],
        file=transfer.request.filename,
        bytes=transfer.bytes_acknowledged,
        blksize=transfer.blksize,
        windowsize=transfer.windowsize,
        error=error,
    )


async def start_dhcp(
    rt: ServiceRuntime,
    script_url: str,
    emit: Emitter,
    registry: RegistryClient,
    traces: BootTraces,
    addresses: ClientAddresses,
) -> DhcpServer:
    s = rt.settings
    iface = s.dhcp_interface
    server_ip = s.dhcp_server_ip or (interface_address(iface) if iface else s.advertised_host)
    config = DhcpConfig(
        mode=s.dhcp_mode,  # type: ignore[arg-type]
        server_ip=server_ip,
        ipxe_script_url=script_url,
        bios_file=s.boot_bios_file,
        efi64_file=s.boot_efi64_file,
        pool_start=s.dhcp_pool_start,
        pool_end=s.dhcp_pool_end,
        subnet_mask=s.dhcp_subnet_mask,
        router=s.dhcp_router,
        dns=tuple(s.dhcp_dns),
        lease_s=s.dhcp_lease_s,
        announce_per_s=s.dhcp_announce_per_s,
    )
    leases, writer = None, None
    if config.mode == "full":
        if not (config.pool_start and config.pool_end):
            raise RuntimeError("full DHCP needs STREAMBOOT_DHCP_POOL_START and _POOL_END")
        shared = s.dhcp_lease_store == "nats"
        # Shared: the bucket is the store, the file only its local copy (not read back).
        leases = LeaseStore(leases_path(s), config.pool_start, config.pool_end, load=not shared)
        if shared:
            writer = await SharedLeases.open(rt.js, leases)
            rt.spawn(writer.run(), "dhcp-shared-leases")
            rt.spawn(writer.mirror(), "dhcp-leases-copy")
            await asyncio.wait_for(writer.synced(), SHARED_LEASES_SYNC_S)
            rt.vitals["dhcp_shared_leases"] = writer.stats

    def on_pxe_discover(client: PxeClient) -> None:
        emit.soon(announce_boot(client, registry, emit, traces))

    responder = DhcpResponder(config, leases, on_pxe_discover, addresses=addresses)
    server = DhcpServer(
        responder,
        server_port=s.dhcp_port,
        client_port=s.dhcp_client_port or s.dhcp_port + 1,
        writer=writer,
    )
    sock = open_socket(s.bind_host, s.dhcp_port, iface)
    pxe_sock = open_socket(s.bind_host, s.dhcp_pxe_port, iface) if config.mode == "proxy" else None
    await server.start(sock, pxe_sock)
    return server
