"""The boot service's HTTP endpoints for iPXE and the initramfs.

- ``GET /ipxe/boot.ipxe``: the fixed entry script (chains to the per-client script).
- ``GET /ipxe/script?mac=..&uuid=..[&vdisk=..]``: what this client boots: a refusal
  message, a menu of its vdisks, a kernel-direct boot (``kernel``/``initrd`` with a one-time
  nonce on the command line) or ``sanboot`` of its new session's HTTP URL.
- ``GET /session/redeem?nonce=..``: the session's NBD export and identity, for the
  initramfs; once per nonce, and only to the address the script went to.
- ``GET|HEAD /boot-files/<vdisk>/<version>[/<mac>]/vmlinuz|initrd``: a version's kernel
  and initramfs, from the local vdisk store (Range, keep-alive). The script names the
  client's MAC (``aa-bb-..``) in the path: each transfer is then a span of that boot's
  trace (``kernel download``, ``initrd download``).
- ``GET /failover-nodes`` with ``Authorization: Bearer TOKEN`` (the session's export
  name): ``nbd_nodes=host:port,...``, every live stream node now, for a running client
  whose known nodes all failed (docs/failover.md); only to the session's address, 404
  once it is closed.
- ``GET /booted?mac=..``: the client's OS has booted (``ClientBooted``, once per session).
- ``GET /client/notice?mac=..&kind=..&message=..``: something the client wants the operator
  to see (``ClientNotice``). Both only from the address the MAC's session was issued to.

Scripts are answered with 200: iPXE shows an HTTP error as a bare error code, whereas a
script can tell the person at the machine what is wrong and retry by itself. The one
exception is "busy, retry" (the registry refused the open under back-pressure, or did not
answer in time): 503 with ``Retry-After``, which iPXE's HTTP client honours by asking again
after that many seconds (``http_parse_retry_after`` in iPXE's src/net/tcp/httpcore.c); the
body is the same message-and-retry script, for a client that runs it instead.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.boot import ipxe_scripts as scripts
from services.boot.boot_trace import BootTraces, boot_span, record_boot_span
from services.boot.client_reports import NOTICES_PER_SESSION, ReportBudget, notice_problem
from services.boot.handoff_store import HandoffStore
from services.boot.http_server import Request, Response, file_response
from services.boot.rate_limit import PerSourceRate
from shared.bus import RemoteError, ServiceUnavailable
from shared.contracts.registry import RegistryClient, Session
from shared.endpoints import endpoint_ok
from shared.events import (
    BootMenuShown,
    ClientBooted,
    ClientNotice,
    Event,
    HandoffRedeemed,
    NonceRefused,
)

# Alternative stream nodes a redeem answer names (each "host:port" at most ~22 bytes).
MAX_FAILOVER_NODES = 8

log = logging.getLogger("streamboot.boot.ipxe")

_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")
_UUID = re.compile(r"^[0-9a-fA-F-]{32,36}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_BEARER = re.compile(r"^Bearer ([A-Za-z0-9_-]{16,128})$")
# A stranded client asks about once every few seconds: more is someone guessing tokens.
REFRESH_RATE_PER_S, REFRESH_BURST = 1.0, 10
_BOOT_FILE = re.compile(
    r"^/boot-files/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/([0-9]{1,9})"
    r"(?:/([0-9a-f]{2}(?:-[0-9a-f]{2}){5}))?/(vmlinuz|initrd)$"
)
# The span of each boot file's transfer.
DOWNLOAD_SPANS = {"vmlinuz": "kernel download", "initrd": "initrd download"}
IPXE = "text/plain; charset=utf-8"
RETRY_BUSY_S = 10  # registry away, or a live session that has not closed yet
REFUSED_WAIT_S = 60
MAX_RETRY_AFTER_S = 60  # a registry's busy answer asks for no longer than this


class Busy(Exception):
    """The script request cannot be served now: answered 503 with ``Retry-After``."""

    def __init__(self, lines: list[str], retry_url: str, retry_after_s: int) -> None:
        super().__init__(lines[0])
        self.retry_after_s = retry_after_s
        self.script = scripts.message_script(lines, retry_url=retry_url, wait_s=retry_after_s)


def retry_after(detail: Any) -> int:
    """The registry's suggested retry delay (``detail.retry_after_s``), within sane bounds."""
    wait = detail.get("retry_after_s") if isinstance(detail, dict) else None
    if isinstance(wait, int) and not isinstance(wait, bool) and 1 <= wait <= MAX_RETRY_AFTER_S:
        return wait
    return RETRY_BUSY_S


def normalize_mac(value: str) -> str | None:
    mac = value.strip().lower()
    return mac.replace("-", ":") if _MAC.match(mac) else None


class BootHttp:
    def __init__(
        self,
        registry: RegistryClient,
        handoffs: HandoffStore,
        emit: Callable[[Event], None],
        *,
        base_url: str,
        menu_timeout_s: int = 10,
        traces: BootTraces | None = None,
        boot_files_root: Path | None = None,
        check_client_address: bool = True,
    ) -> None:
        self.registry, self.handoffs, self.emit = registry, handoffs, emit
        self.base_url, self.menu_timeout_s = base_url.rstrip("/"), menu_timeout_s
        self.traces = traces
        # The local vdisk store, where the registry keeps each version's boot files.
        self.boot_files_root = boot_files_root
        # Off for NAT labs, where every client reaches the server from one address.
        self.check_client_address = check_client_address
        self.reports = ReportBudget()
        self.refreshes = PerSourceRate(REFRESH_RATE_PER_S, REFRESH_BURST)

    async def __call__(self, request: Request) -> Response:
        if request.path == "/ipxe/boot.ipxe":
            return Response(200, scripts.boot_script(self.base_url), IPXE)
        if request.path == "/ipxe/script":
            try:
                return Response(200, await self.traced_script(request), IPXE)
            except Busy as exc:
                return Response(503, exc.script, IPXE, retry_after_s=exc.retry_after_s)
        if request.path == "/session/redeem":
            return await self.redeem(request)
        if request.path.startswith("/boot-files/"):
            return await self.boot_file(request)
        if request.path == "/failover-nodes":
            return await self.failover_nodes(request)
        if request.path == "/booted":
            return await self.booted(request)
        if request.path == "/client/notice":
            return await self.notice(request)
        if request.path == "/healthz":
            return Response(200, "ok\n")
        return Response(404, "not found\n")

    async def traced_script(self, request: Request) -> str:
        """The script request as a span of the boot's trace (the registry's lookup and
        session opening become its children through the NATS headers)."""
        mac = normalize_mac(request.query.get("mac", ""))
        if mac is None or self.traces is None:
            return await self.client_script(request)
        boot = await self.traces.current(mac)
        with boot_span("ipxe script", boot, mac=mac, vdisk=request.query.get("vdisk")):
            return await self.client_script(request, boot)

    async def boot_file(self, request: Request) -> Response:
        """A version's kernel or initramfs, as the registry stored it when it was published;
        its transfer a span of the boot's trace when the path names the MAC."""
        m = _BOOT_FILE.match(request.path)
        if m is None or self.boot_files_root is None:
            return Response(404, "not found\n")
        vdisk, version, mac, name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        response = file_response(
            str(self.boot_files_root / vdisk / "boot" / f"v{version}" / name), request
        )
        if mac and response.file is not None and request.method == "GET":
            entry = await self.handoffs.get_boot(mac.replace("-", ":"))
            root = (entry or {}).get("boot_traceparent")
            if root:
                span = transfer_span(DOWNLOAD_SPANS[name], root, mac, request)
                return dataclasses.replace(response, sent=span)
        return response

    async def _reporter(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        """The MAC and its latest boot for a report from the client, or the refusal."""
        mac = normalize_mac(request.query.get("mac", ""))
        entry = await self.handoffs.get_boot(mac) if mac else None
        if mac is None or entry is None:
            return Response(404, "no session was opened for this machine\n")
        if self._wrong_address(entry, request):
            log.warning("boot: %s from %s refused: not the address of %s's session",
                        request.path, request.client_ip, mac)  # fmt: skip
            return Response(403, "wrong client address\n")
        return mac, entry

    async def booted(self, request: Request) -> Response:
        """The client's OS says it has booted (the end of its boot phase)."""
        got = await self._reporter(request)
        if isinstance(got, Response):
            return got
        mac, entry = got
        if not self.reports.take(entry["session_id"], "booted", 1):
            return Response(200, "ok (said already)\n")
        root = entry.get("boot_traceparent")
        with boot_span("booted", {"traceparent": root} if root else None, mac=mac):
            self.emit(ClientBooted(session_id=entry["session_id"], mac=mac))
        return Response(200, "ok\n")

    async def notice(self, request: Request) -> Response:
        """Something the client wants the operator to see, as a ClientNotice event."""
        kind, message = request.query.get("kind", ""), request.query.get("message", "")
        if problem := notice_problem(kind, message):
            return Response(400, f"{problem}\n")
        got = await self._reporter(request)
        if isinstance(got, Response):
            return got
        mac, entry = got
        if not self.reports.take(entry["session_id"], "notice", NOTICES_PER_SESSION):
            return Response(429, "too many notices for this session\n")
        log.warning("boot: %s says (%s): %s", mac, kind, message)
        self.emit(ClientNotice(session_id=entry["session_id"], mac=mac, kind=kind, message=message))
        return Response(200, "ok\n")

    async def failover_nodes(self, request: Request) -> Response:
        """The live stream nodes for a running client whose known ones all failed: the
        session's token proves which session, its address that it is that client."""
        if request.method != "GET":
            return Response(405, "ask with GET\n")
        if not self.refreshes.allow(request.client_ip):
            return Response(429, "too many requests\n")
        m = _BEARER.match(request.headers.get("authorization", ""))
        if m is None:
            return Response(404, "session unknown\n")
        try:
            found = await self.registry.session_nodes(m.group(1))
        except (RemoteError, ValueError):
            return Response(404, "session unknown\n")
        except ServiceUnavailable:
            return Response(503, "registry unavailable\n")
        if self._wrong_address({"client_ip": found.client_addr}, request):
            log.warning("boot: node list for session %s asked from %s: not its address",
                        found.session_id, request.client_ip)  # fmt: skip
            return Response(403, "wrong client address\n")
        # From heartbeats, which are not trusted: only what the client's helper can dial.
        nodes = [n for n in found.nbd_nodes if endpoint_ok(n)][:MAX_FAILOVER_NODES]
        return Response(200, f"nbd_nodes={','.join(nodes)}\n")

    def _wrong_address(self, entry: dict[str, Any], request: Request) -> bool:
        want = entry.get("client_ip")
        return bool(self.check_client_address and want and want != request.client_ip)

    async def abandon(self, nonce: str, mac: str, request: Request) -> None:
        """A kernel-direct boot whose kernel did not load gives its nonce back: the nonce is
        spent and its session closed, so the retry opens a new one at once. Only an unused
        nonce of this MAC, from its address, does that."""
        got = await self.handoffs.redeem(
            nonce, request.client_ip if self.check_client_address else None
        )
        if got.outcome != "ok" or got.entry is None or got.entry.get("mac") != mac:
            return
        try:
            await self.registry.close(got.entry["token"], "kernel-load-failed")
            log.info("boot: %s could not load its kernel; session %s closed", mac,
                     got.entry["session_id"])  # fmt: skip
        except (RemoteError, ServiceUnavailable) as exc:
            log.warning("boot: closing the abandoned session of %s failed: %s", mac, exc)

    async def redeem(self, request: Request) -> Response:
        """The initramfs trades its nonce for the session's export, once (docs/boot.md)."""
        if request.method != "GET":
            return Response(405, "redeem with GET\n")  # a HEAD would spend the nonce unseen
        nonce = request.query.get("nonce", "")
        if not _NONCE.match(nonce):
            return Response(404, "nonce unknown\n")
        got = await self.handoffs.redeem(
            nonce, request.client_ip if self.check_client_address else None
        )
        entry = got.entry or {}
        root = entry.get("boot_traceparent")
        with boot_span("redeem", {"traceparent": root} if root else None) as span:
            response = await self._redeemed(got.outcome, entry, request)
            span.set_attribute("http.status_code", response.status)
        if response.status == 200:
            self.emit(
                HandoffRedeemed(session_id=entry["session_id"], client_addr=request.client_ip)
            )
        else:
            log.warning(
                "boot: redeem from %s refused: %s", request.client_ip, response.body.strip()
            )
            if entry.get("session_id"):
                self.emit(
                    NonceRefused(
                        session_id=entry["session_id"],
                        client_addr=request.client_ip,
                        reason=response.body.strip(),
                    )
                )
        return response

    async def _redeemed(self, outcome: str, entry: dict[str, Any], request: Request) -> Response:
        if outcome == "unknown":
            return Response(404, "nonce unknown\n")
        if outcome == "redeemed":
            return Response(410, "nonce already redeemed\n")
        if outcome == "wrong-address":
            return Response(403, "wrong client address\n")
        try:
            live = await self.registry.resolve(entry["token"])
        except (RemoteError, ValueError):
            return Response(410, "session closed\n")
        except ServiceUnavailable:
            return Response(503, "registry unavailable, the nonce is spent: boot again\n")
        if live.session_id != entry["session_id"]:
            return Response(410, "session closed\n")
        answer = {
            "mac": entry.get("mac"),
            "nbd_host": entry["nbd_host"],
            "nbd_port": entry["nbd_port"],
            # The first few, each one the helper can dial (redeem_text bounds the line).
            "nbd_nodes": ",".join(
                [n for n in entry.get("nbd_nodes") or () if endpoint_ok(n)][:MAX_FAILOVER_NODES]
            ),
            "export": entry["token"],
            "write_cache": live.write_cache or entry["write_cache"],
            "persistence": live.write_cache_persistence or entry["persistence"],
            "hostname": entry.get("hostname"),
            "machine_id": entry.get("machine_id"),
            "session_id": entry["session_id"],
            "traceparent": entry.get("boot_traceparent"),
        }
        return Response(200, scripts.redeem_text(answer))

    async def client_script(self, request: Request, boot: dict[str, Any] | None = None) -> str:
        query = request.query
        mac = normalize_mac(query.get("mac", ""))
        if mac is None:
            log.warning("boot: script asked with a bad MAC %r", query.get("mac"))
            return scripts.message_script([f"bad MAC address {query.get('mac', '')!r}"])
        uuid = query.get("uuid") or None
        if uuid is not None and not _UUID.match(uuid):
            uuid = None  # iPXE leaves ${uuid} empty or odd on some firmware: MAC is enough
        chosen = query.get("vdisk") or None
        retry = scripts.script_url(self.base_url, mac, uuid, chosen)
        if _NONCE.match(query.get("abandon", "")):
            await self.abandon(query["abandon"], mac, request)
        try:
            device = await self.registry.lookup(mac, uuid)
            if not device.vdisks:
                return scripts.message_script(
                    [f"{device.hostname or mac}: no vdisk is assigned to this machine",
                     f"assign one: streamboot assign {mac} VDISK"],
                    retry_url=retry, wait_s=REFUSED_WAIT_S,
                )  # fmt: skip
            maintained = device.maintenance and chosen is None
            if maintained:
                # Maintenance boots the default vdisk read-write: the registry opens a
                # maintenance session for it (docs/registry.md); no menu to pick another.
                chosen = device.default or device.vdisks[0]
            if chosen is None and len(device.vdisks) > 1:
                self.emit(BootMenuShown(mac=mac, vdisks=device.vdisks, default=device.default))
                return scripts.menu_script(
                    title=f"choose what {device.hostname or mac} boots",
                    vdisks=device.vdisks,
                    default=device.default,
                    timeout_s=self.menu_timeout_s,
                    choice_url={
                        v: scripts.script_url(self.base_url, mac, uuid, v) for v in device.vdisks
                    },
                )
            if chosen is not None:
                if chosen not in device.vdisks:
                    return scripts.message_script(
                        [f"vdisk {chosen} is not assigned to {device.hostname or mac}"],
                        retry_url=scripts.script_url(self.base_url, mac, uuid),
                    )
                if not maintained:
                    self.emit(
                        BootMenuShown(
                            mac=mac, vdisks=device.vdisks, default=device.default, chosen=chosen
                        )
                    )
            session = await self.registry.open_session(
                mac, uuid, chosen or device.vdisks[0], boot=boot, client_addr=request.client_ip
            )
        except RemoteError as exc:
            if exc.kind == "busy":  # back-pressure: nothing was opened
                wait = retry_after(exc.detail)
                log.info("boot: %s: registry busy, told to retry in %ds", mac, wait)
                raise Busy(["the boot server is busy"], retry, wait) from exc
            log.warning("boot: %s refused: %s (%s)", mac, exc, exc.kind)
            if exc.kind == "conflict":  # e.g. its previous session is still closing
                return scripts.message_script(
                    [f"cannot boot {mac} now: {exc}"], retry_url=retry, wait_s=RETRY_BUSY_S
                )
            if exc.kind in ("not_found", "refused"):
                return scripts.message_script(
                    [f"this machine ({mac}) may not boot here: {exc}",
                     "an administrator can add it: streamboot device add"],
                    wait_s=REFUSED_WAIT_S,
                )  # fmt: skip
            return scripts.message_script(
                [f"boot server error: {exc}"], retry_url=retry, wait_s=REFUSED_WAIT_S
            )
        except ServiceUnavailable as exc:
            log.error("boot: registry unavailable for %s: %s", mac, exc)
            raise Busy(["the boot server is busy or starting"], retry, RETRY_BUSY_S) from exc
        await self.handoffs.put_boot(
            mac,
            {
                "session_id": session.session_id,
                "client_ip": request.client_ip,
                "boot_traceparent": session.boot_traceparent,
            },
        )
        log.info(
            "boot: %s boots %s v%d (session %s)", mac, session.vdisk, session.version,
            session.session_id,
        )  # fmt: skip
        info = scripts.SessionInfo(
            session.vdisk, session.version, session.http_url, session.hostname, session.http_nodes
        )
        retry = scripts.script_url(self.base_url, mac, uuid)
        how = session.boot or {}
        iscsi = None
        if how.get("method") in ("sanboot-iscsi", "iscsi-ibft"):
            if not (session.iscsi_portal and session.iscsi_target and session.initiator_iqn):
                return scripts.message_script(
                    ["the stream node advertises no iSCSI portal"], retry_url=retry,
                    wait_s=RETRY_BUSY_S,
                )  # fmt: skip
            iscsi = scripts.IscsiBoot(
                session.iscsi_portal, session.iscsi_target, session.initiator_iqn, session.chap
            )
        if how.get("method") == "sanboot-iscsi" and iscsi is not None:
            return scripts.iscsi_sanboot_script(info, iscsi, retry_url=retry)
        if how.get("method") not in ("kernel", "nbdroot", "iscsi-ibft"):
            return scripts.sanboot_script(info, retry_url=retry)
        files_url = f"{self.base_url}/boot-files/{session.vdisk}/{session.version}/" + mac.replace(
            ":", "-"
        )
        if how.get("method") == "iscsi-ibft" and iscsi is not None:
            # The path Windows takes, for a Linux image: the iBFT iPXE leaves names the disk
            # and the image's own open-iscsi initramfs logs in from it (docs/iscsi.md).
            ibft = scripts.IbftBoot(iscsi=iscsi, **clientless_boot(files_url, how, session))
            return scripts.ibft_script(info, ibft, retry_url=retry)
        if how.get("method") == "nbdroot":
            # An image without the streamboot client: no nonce to redeem, the export on the
            # command line for Debian's own initramfs (docs/clients.md says what that costs).
            nbdroot = scripts.NbdRootBoot(
                nbdroot=f"{session.nbd_host}:{session.nbd_port}/{session.token}",
                **clientless_boot(files_url, how, session),
            )
            return scripts.nbdroot_script(info, nbdroot, retry_url=retry)
        nonce = await self.handoffs.issue(
            {
                "session_id": session.session_id,
                "token": session.token,
                "client_ip": request.client_ip,
                "mac": mac,
                "nbd_host": session.nbd_host,
                "nbd_port": session.nbd_port,
                "nbd_nodes": list(session.nbd_nodes),
                "write_cache": session.write_cache,
                "persistence": session.write_cache_persistence,
                "hostname": session.hostname,
                "machine_id": session.machine_id,
                "boot_traceparent": session.boot_traceparent,
            }
        )
        kernel = scripts.KernelBoot(
            files_url=files_url,
            server=self.base_url,
            nonce=nonce,
            root=str(how.get("root") or "whole"),
            write_cache=session.write_cache,
            hostname=session.hostname or "",
            machine_id=session.machine_id or "",
            extra_args=session.kernel_args,
            kernel_version=how.get("kernel_version"),
        )
        return scripts.kernel_script(info, kernel, retry_url=retry)


def clientless_boot(files_url: str, how: dict[str, Any], session: Session) -> dict[str, Any]:
    """What a kernel-direct boot without the streamboot client takes from the session (its
    image's files, root and kernel, the device's identity), whatever carries its root."""
    return {
        "files_url": files_url,
        "root": str(how.get("root") or "whole"),
        "hostname": session.hostname or "",
        "machine_id": session.machine_id or "",
        "extra_args": session.kernel_args,
        "kernel_version": how.get("kernel_version"),
    }


def transfer_span(name: str, root: str, mac: str, request: Request) -> Callable[[int, bool], None]:
    """What the server calls once a boot file's bytes are sent: the transfer as a finished
    span of the boot's trace (from the request to its last byte)."""
    started = time.time_ns()
    wanted = request.headers.get("range")

    def sent(n: int, complete: bool) -> None:
        record_boot_span(
            name, {"traceparent": root}, started, time.time_ns(),
            mac=mac.replace("-", ":"), bytes=n, range=wanted, complete=complete,
        )  # fmt: skip

    return sent
