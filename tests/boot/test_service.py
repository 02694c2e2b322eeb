"""The boot service (its real `start`, in this test's loop) against the real registry on
real NATS and PostgreSQL: iPXE scripts, menus, the hand-off, BootRequested from DHCP."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.boot import dhcp_packets as dp
from services.boot.boot_trace import BootTraces
from services.boot.client_reports import NOTICES_PER_SESSION
from services.boot.service import start
from shared import bus
from shared.service import ServiceRuntime
from shared.settings import Settings
from shared.telemetry import parse_traceparent
from streamboot.client_package import PACKAGE_TREE
from streamboot.embedded.proc import free_port
from tests.conftest import BusServer, wait_for
from tests.registry.conftest import INITRD, KERNEL, Registry, write_bootable_image, write_image

pytestmark = pytest.mark.timeout(120)
MAC = "52:54:00:12:34:56"
UUID = "d4c3b2a1-f6e5-1807-293a-4b5c6d7e8f90"
FIXTURES = Path(__file__).parent / "fixtures"
CORE = PACKAGE_TREE / "usr/lib/streamboot/client.sh"


@dataclass
class Boot:
    rt: ServiceRuntime
    url: str
    tftp_root: Path
    stopped: bool = False

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    async def script(self, **query: str) -> str:
        async with self.http() as http:
            r = await http.get("/ipxe/script", params=query)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text


@pytest.fixture
async def boot(registry: Registry, nats_server: BusServer, tmp_path: Path) -> AsyncIterator[Boot]:
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "ipxe.efi").write_bytes(os.urandom(70_000))
    settings = Settings(
        data_dir=tmp_path / "boot-data",
        **nats_server.settings("boot"),
        node_id="boot-test",
        boot_http_port=0,
        tftp_port=0,
        tftp_root=root,
        dhcp_mode="proxy",
        dhcp_port=free_port(),
        dhcp_pxe_port=free_port(),
        ipxe_menu_timeout_s=5,
        vdisk_dir=registry.app.vdisk_root,  # one machine: the registry's store, as under `up`
    )
    rt = ServiceRuntime("boot", settings)
    await rt.connect()
    await start(rt)
    boot = Boot(rt, rt.vitals["boot_http"], root)
    try:
        yield boot
    finally:
        if not boot.stopped:
            await rt.stop()


async def seed(reg: Registry, tmp: Path, mac: str, *names: str, default: str | None = None) -> None:
    async with reg.http() as http:
        r = await http.post("/devices", json={"mac": mac})
        assert r.status_code == 201, r.text
        for name in names:
            image = write_image(tmp / f"{name}.raw", 1 << 20, {0: name.encode()})
            await reg.cli_json("vdisk", "import", str(image), "--name", name)
            body = {"target": mac, "vdisk": name, "default": name == (default or names[0])}
            r = await http.post("/assignments", json=body)
            assert r.status_code == 200, r.text


async def events_of(reg: Registry, kind: str, count: int) -> list[Any]:
    for _ in range(100):
        found = await reg.app.store.read_all(types=[kind])
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} {kind} events never reached the log")


async def test_vitals_advertise_endpoints(boot: Boot) -> None:
    vitals = boot.rt.vitals
    assert vitals["boot_http"].startswith("http://127.0.0.1:")
    assert vitals["tftp"].startswith("127.0.0.1:") and vitals["dhcp"].startswith("127.0.0.1:")


async def test_entry_script(boot: Boot) -> None:
    async with boot.http() as http:
        r = await http.get("/ipxe/boot.ipxe")
    assert r.status_code == 200
    assert f"chain {boot.url}/ipxe/script?mac=${{mac}}&uuid=${{uuid}}" in r.text


async def test_unknown_device_is_refused_on_screen(boot: Boot, registry: Registry) -> None:
    script = await boot.script(mac=MAC, uuid=UUID)
    assert "may not boot here" in script and MAC in script
    assert script.rstrip().endswith("shell") and "sanboot" not in script
    assert registry.app.list_sessions() == []


async def test_a_vdisk_without_a_kernel_boots_by_sanboot(
    boot: Boot, registry: Registry, nc: Any
) -> None:
    await seed(registry, registry.data_dir, MAC, "win")
    script = await boot.script(mac=MAC.upper().replace(":", "-"), uuid=UUID)
    [line] = [x for x in script.splitlines() if x.startswith("sanboot ")]
    url = line.split()[1]
    [session] = registry.app.list_sessions()
    assert session["mac"] == MAC and session["vdisk"] == "win"
    assert session["client_addr"] == "127.0.0.1"  # where the script was asked from
    assert url.startswith(session["http_url"]) and len(url) > len(session["http_url"])
    token = url[len(session["http_url"]) :]
    assert "kernel " not in script and "nonce" not in script

    # The old hand-off gave any caller a live session's read-write export: gone.
    async with boot.http() as http:
        r = await http.get("/handoff", params={"mac": MAC})
        assert r.status_code == 404 and token not in r.text

    # Booting again while the session is live: told on screen, retried by itself.
    again = await boot.script(mac=MAC, uuid=UUID)
    assert "cannot boot" in again and "chain " in again and "sanboot" not in again
    await bus.request_json(nc, "streamboot.registry.session.close", {"token": token})


async def test_sanboot_iscsi_script_logs_in_as_the_device_with_its_chap(
    boot: Boot, registry: Registry, nc: Any
) -> None:
    await seed(registry, registry.data_dir, MAC, "win")
    await registry.cli_json("vdisk", "set", "win", "--boot", "sanboot-iscsi")
    await registry.cli_json("device", "set", MAC, "--chap-user", "pc-1", "--chap-secret",
                            "secret-of-pc-1", "--chap-reverse-user", "sb", "--chap-reverse-secret",
                            "secret-of-the-target")  # fmt: skip
    script = await boot.script(mac=MAC, uuid=UUID)
    [session] = registry.app.list_sessions()
    iqn = "iqn.2026-12.io.streamboot.client:" + MAC.replace(":", "")
    assert session["initiator_iqn"] == iqn
    lines = script.splitlines()
    assert f"set initiator-iqn {iqn}" in lines
    for line in ("set username pc-1", "set password secret-of-pc-1", "set reverse-username sb",
                 "set reverse-password secret-of-the-target"):  # fmt: skip
        assert line in lines, script
    [sanboot] = [x for x in lines if x.startswith("sanboot ")]
    # iscsi:<server>::<port>:0:<target>; the target names the session by its token.
    server, proto, port, lun, target = sanboot.split()[1].removeprefix("iscsi:").split(":", 4)
    assert (proto, lun, f"{server}:{port}") == ("", "0", session["iscsi_portal"])
    token = target.removeprefix("iqn.2026-12.io.streamboot:")
    resolved = await bus.request_json(nc, "streamboot.registry.session.resolve", {"token": token})
    assert resolved["initiator_iqn"] == iqn and resolved["chap"]["secret"] == "secret-of-pc-1"
    await bus.request_json(nc, "streamboot.registry.session.close", {"token": token})


async def test_iscsi_ibft_script_hooks_the_device_s_disk_and_boots_the_kernel(
    boot: Boot, registry: Registry, nc: Any
) -> None:
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await seed_image(registry, MAC, "linux", image)
    await registry.cli_json("vdisk", "set", "linux", "--boot", "iscsi-ibft")
    await registry.cli_json("device", "set", MAC, "--chap-user", "pc-1", "--chap-secret",
                            "secret-of-pc-1")  # fmt: skip
    script = await boot.script(mac=MAC, uuid=UUID)
    [session] = registry.app.list_sessions()
    lines = script.splitlines()
    assert f"set initiator-iqn {session['initiator_iqn']}" in lines
    assert "set username pc-1" in lines and "set password secret-of-pc-1" in lines
    [hook] = [x for x in lines if x.startswith("sanhook ")]
    server, _, port, _, target = hook.split()[1].removeprefix("iscsi:").split(":", 4)
    assert f"{server}:{port}" == session["iscsi_portal"]
    [kernel] = [x for x in lines if x.startswith("kernel ")]
    scanned = registry.app.vdisk_view("linux")["boot"]["1"]
    assert kernel == (
        f"kernel {boot.url}/boot-files/linux/1/{MAC.replace(':', '-')}/vmlinuz initrd=initrd "
        "iscsi_auto "
        f"root={scanned['root']} rw systemd.hostname={session['hostname']} "
        f"systemd.machine_id={session['machine_id']} || goto failed"
    )
    assert lines.index(hook) < lines.index(kernel) and "nonce" not in script
    token = target.removeprefix("iqn.2026-12.io.streamboot:")
    await bus.request_json(nc, "streamboot.registry.session.close", {"token": token})


async def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """Real curl, in a thread: the boot service answers in this test's own event loop."""
    return await asyncio.to_thread(
        subprocess.run, ["curl", "-sS", *args], capture_output=True, text=True, timeout=30
    )


async def test_kernel_direct_boot_with_a_one_time_nonce(
    boot: Boot, registry: Registry, nc: Any
) -> None:
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await registry.cli_json("vdisk", "import", str(image), "--name", "linux")
    async with registry.http() as http:
        body = {"mac": MAC, "kernel_args": "console=ttyS0 quiet"}
        assert (await http.post("/devices", json=body)).status_code == 201
        body = {"target": MAC, "vdisk": "linux", "default": True}
        assert (await http.post("/assignments", json=body)).status_code == 200
    script = await boot.script(mac=MAC, uuid=UUID)
    [kernel] = [x for x in script.splitlines() if x.startswith("kernel ")]
    [session] = registry.app.list_sessions()
    scanned = registry.app.vdisk_view("linux")["boot"]["1"]
    files = f"{boot.url}/boot-files/linux/1/{MAC.replace(':', '-')}"
    nonce = kernel.split("streamboot.nonce=")[1].split()[0]
    assert kernel == (
        f"kernel {files}/vmlinuz initrd=initrd boot=streamboot root=streamboot ip=dhcp "
        "rd.neednet=1 streamboot.ip=${ip}:${gateway}:${netmask} BOOTIF=01-${mac:hexhyp} "
        f"streamboot.server={boot.url} streamboot.nonce={nonce} "
        f"streamboot.root={scanned['root']} streamboot.wc=server-disk "
        f"systemd.hostname={session['hostname']} systemd.machine_id={session['machine_id']} "
        "console=ttyS0 quiet || goto failed"
    )
    assert f"initrd --name initrd {files}/initrd || goto failed" in script
    assert scanned["root"].startswith("UUID=") and len(nonce) >= 16

    # The kernel and initramfs, as iPXE loads them: whole, by range, on one connection.
    whole = await curl(
        "-v", f"{files}/vmlinuz", "-o", "/dev/null", f"{files}/initrd", "-o", "/dev/null"
    )
    assert whole.returncode == 0 and "Re-using existing connection" in whole.stderr, whole.stderr
    assert (await curl(f"{files}/vmlinuz")).stdout.encode() == KERNEL
    part = await curl("-i", "-r", "12-23", f"{files}/initrd")
    assert part.stdout.startswith("HTTP/1.1 206") and "Content-Range: bytes 12-23/" in part.stdout
    assert part.stdout.endswith(INITRD[12:24].decode())
    head = (await curl("-I", f"{files}/initrd")).stdout
    assert f"Content-Length: {len(INITRD)}" in head and "Accept-Ranges: bytes" in head
    assert (await curl("-i", "-r", f"{len(INITRD)}-", f"{files}/initrd")).stdout.startswith(
        "HTTP/1.1 416"
    )
    huge = "9" * 5000  # past what int() takes: a 416 or the whole file, no traceback
    too_far = await curl("-i", "-H", f"Range: bytes={huge}-", f"{files}/initrd")
    assert too_far.stdout.startswith("HTTP/1.1 416"), too_far.stdout
    to_the_end = await curl("-H", f"Range: bytes=0-{huge}", f"{files}/initrd")
    assert to_the_end.stdout.encode() == INITRD
    assert (
        await curl("-o", "/dev/null", "-w", "%{http_code}", f"{files}/../v1.raw")
    ).stdout == "404"

    # The nonce: not from another address, then once, then never again.
    redeem = f"{boot.url}/session/redeem?nonce={nonce}"
    assert (await curl("-I", redeem)).stdout.startswith("HTTP/1.1 405")  # spends nothing
    other = (await curl("-i", "--interface", "127.0.0.2", redeem)).stdout
    assert other.startswith("HTTP/1.1 403") and other.endswith("wrong client address\n")
    answer = (await curl("-i", redeem)).stdout
    assert answer.startswith("HTTP/1.1 200"), answer
    lines = dict(x.split("=", 1) for x in answer.split("\n\n", 1)[1].splitlines())
    assert lines["mac"] == MAC.lower()
    assert lines["nbd_port"] and lines["nbd_host"] and lines["export"]
    assert f"nbd://{lines['nbd_host']}:{lines['nbd_port']}/" == session["nbd_uri"]
    assert lines["write_cache"] == "server-disk" and lines["persistence"] == "discard"
    assert lines["hostname"] == session["hostname"]
    assert lines["machine_id"] == session["machine_id"]
    assert lines["session_id"] == session["session_id"]
    resolved = await bus.request_json(
        nc, "streamboot.registry.session.resolve", {"token": lines["export"]}
    )
    assert resolved["session_id"] == session["session_id"]
    assert resolved["client_addr"] == "127.0.0.1"
    again = (await curl("-i", redeem)).stdout
    assert again.startswith("HTTP/1.1 410") and again.endswith("nonce already redeemed\n")
    unknown = (await curl("-i", f"{boot.url}/session/redeem?nonce={'x' * 32}")).stdout
    assert unknown.startswith("HTTP/1.1 404") and unknown.endswith("nonce unknown\n")
    refused = await events_of(registry, "NonceRefused", 2)
    assert [(e.data["client_addr"], e.data["reason"]) for e in refused] == [
        ("127.0.0.2", "wrong client address"),
        ("127.0.0.1", "nonce already redeemed"),
    ]
    [handoff] = await events_of(registry, "HandoffRedeemed", 1)
    assert handoff.data == {"session_id": session["session_id"], "client_addr": "127.0.0.1"}

    # A vdisk that must boot by sanboot does, whatever it holds.
    await bus.request_json(nc, "streamboot.registry.session.close", {"token": lines["export"]})
    await registry.cli_json("vdisk", "set", "linux", "--boot-method", "sanboot")
    assert "sanboot " in await boot.script(mac=MAC, uuid=UUID)


async def test_a_kernel_that_did_not_load_gives_its_nonce_back(
    boot: Boot, registry: Registry
) -> None:
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await seed_image(registry, MAC, "linux", image)
    first = await boot.script(mac=MAC, uuid=UUID)
    nonce = first.split("streamboot.nonce=")[1].split()[0]
    [old] = registry.app.list_sessions()
    # Another machine cannot close the session with the nonce (wrong address): refused.
    other = await curl("-sS", "--interface", "127.0.0.2",
                       f"{boot.url}/ipxe/script?mac={MAC}&abandon={nonce}")  # fmt: skip
    assert "already has a live session" in other.stdout
    # iPXE's retry after a failed `kernel`: the old session closes, a new one opens at once.
    again = await boot.script(mac=MAC, uuid=UUID, abandon=nonce)
    assert "kernel " in again and nonce not in again
    [new] = registry.app.list_sessions()
    assert new["session_id"] != old["session_id"]
    closed = await events_of(registry, "SessionClosed", 1)
    assert closed[0].data["reason"] == "kernel-load-failed"


async def test_the_client_reports_booted_and_notices_from_its_own_address(
    boot: Boot, registry: Registry
) -> None:
    """The client core's report functions (as the initramfs and the booted OS's
    streamboot-booted.service call them) against the real endpoints; hostile input refused."""
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await seed_image(registry, MAC, "linux", image)
    await boot.script(mac=MAC, uuid=UUID)  # the session, issued to 127.0.0.1
    [session] = registry.app.list_sessions()
    mac = MAC.lower()

    def core(script: str, **env: str) -> subprocess.CompletedProcess[str]:
        prelude = f"SB_RUN={registry.data_dir}/run SB_SERVER={boot.url} SB_MAC={mac}\n. {CORE}\n"
        return subprocess.run(["sh", "-c", prelude + script], capture_output=True, text=True,
                              timeout=60, check=False, env={**os.environ, **env})  # fmt: skip

    said = "no local partition labelled streamboot-wc: RAM (it's 100% lost) & <gone>"
    done = await asyncio.to_thread(core, 'sb_notice wc-ram-fallback "$SAID"; echo rc=$?', SAID=said)
    assert done.stdout.strip() == "rc=0", done
    done = await asyncio.to_thread(core, "sb_report_booted && sb_report_booted; echo rc=$?")
    assert done.stdout.strip() == "rc=0", done
    [notice] = await events_of(registry, "ClientNotice", 1)
    assert notice.data == {
        "session_id": session["session_id"], "mac": mac, "kind": "wc-ram-fallback",
        # What the shell could not put in a URL became "_", nothing else changed.
        "message": "no local partition labelled streamboot-wc: RAM (it_s 100_ lost) _ _gone_",
    }  # fmt: skip
    [booted] = await events_of(registry, "ClientBooted", 1)  # once, though said twice
    assert booted.data == {"session_id": session["session_id"], "mac": mac}

    # Another machine cannot speak for this one; hostile input is refused, nothing appended.
    url = f"{boot.url}/client/notice?mac={mac}"
    other = await curl("-i", "--interface", "127.0.0.2", f"{url}&kind=x&message=hi")
    assert other.stdout.startswith("HTTP/1.1 403"), other.stdout
    other = await curl("-i", "--interface", "127.0.0.2", f"{boot.url}/booted?mac={mac}")
    assert other.stdout.startswith("HTTP/1.1 403"), other.stdout
    for query, why in [
        ("kind=Wc&message=hi", "lower-case word"),
        ("kind=x&message=", "empty"),
        (f"kind=x&message={'a' * 301}", "longer than 300"),
        ("kind=x&message=a%0d%0aforged%20line", "printable ASCII"),
        ("kind=x&message=%c3%a9", "printable ASCII"),
    ]:
        bad = await curl("-i", f"{url}&{query}")
        assert bad.stdout.startswith("HTTP/1.1 400") and why in bad.stdout, (query, bad.stdout)
    unknown = await curl("-i", f"{boot.url}/client/notice?mac=52:54:00:00:00:99&kind=x&message=hi")
    assert unknown.stdout.startswith("HTTP/1.1 404"), unknown.stdout
    # A budget per session: the log does not fill up with one machine's notices.
    codes = [
        (await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}&kind=x&message={n}")).stdout
        for n in range(NOTICES_PER_SESSION)
    ]
    assert codes == ["200"] * (NOTICES_PER_SESSION - 1) + ["429"]
    # The accepted notices reach the log through the boot service's queued sink.
    notices = await events_of(registry, "ClientNotice", NOTICES_PER_SESSION)
    assert len(notices) == NOTICES_PER_SESSION


async def seed_image(reg: Registry, mac: str, name: str, image: Path) -> None:
    await reg.cli_json("vdisk", "import", str(image), "--name", name)
    async with reg.http() as http:
        assert (await http.post("/devices", json={"mac": mac})).status_code == 201
        body = {"target": mac, "vdisk": name, "default": True}
        assert (await http.post("/assignments", json=body)).status_code == 200


async def test_menu_and_the_choice_are_recorded(boot: Boot, registry: Registry) -> None:
    await seed(registry, registry.data_dir, MAC, "win", "linux", default="linux")
    menu = await boot.script(mac=MAC, uuid=UUID)
    assert "item vd0 win" in menu and "item vd1 linux (default)" in menu
    assert "choose --default vd1 --timeout 5000 target" in menu
    [shown] = await events_of(registry, "BootMenuShown", 1)
    assert shown.data == {
        "mac": MAC,
        "vdisks": ["win", "linux"],
        "default": "linux",
        "chosen": None,
    }
    assert registry.app.list_sessions() == []

    # The client picks "win": the menu item's URL.
    lines = menu.splitlines()
    choice_url = lines[lines.index(":vd0") + 1].removeprefix("chain ")
    async with boot.http() as http:
        r = await http.get(choice_url)
    assert "sanboot " in r.text and "booting win version" in r.text
    _, chosen = await events_of(registry, "BootMenuShown", 2)
    assert chosen.data["chosen"] == "win"
    [session] = registry.app.list_sessions()
    assert session["vdisk"] == "win"

    # A vdisk that is not assigned is refused, with the way back to the menu.
    other = await boot.script(mac="52:54:00:00:00:02", vdisk="win")
    assert "sanboot" not in other


async def test_pxe_discover_emits_boot_requested(boot: Boot, registry: Registry) -> None:
    await seed(registry, registry.data_dir, MAC, "win", "linux", default="linux")
    port = int(boot.rt.vitals["dhcp"].rsplit(":", 1)[1])
    discover = (FIXTURES / "udhcpc_pxe_discover.bin").read_bytes()
    ipxe = dp.parse(discover)
    ipxe.options[dp.OPT_USER_CLASS] = b"iPXE"

    def go() -> list[dp.DhcpPacket]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            replies = []
            for packet in (discover, dp.build(ipxe)):
                sock.sendto(packet, ("127.0.0.1", port))
                replies.append(dp.parse(sock.recv(2048)))
            return replies

    firmware, already_ipxe = await asyncio.to_thread(go)
    assert firmware.file == b"ipxe.efi"
    assert already_ipxe.file == f"{boot.url}/ipxe/boot.ipxe".encode()
    requested = await events_of(registry, "BootRequested", 2)
    # With what it will most likely boot, for the cache to warm: its default vdisk.
    assert requested[0].data == {
        "mac": MAC,
        "smbios_uuid": UUID,
        "arch": 7,
        "vdisk": "linux",
        "version": 1,
    }


async def test_boot_requested_for_an_unknown_device(boot: Boot, registry: Registry) -> None:
    port = int(boot.rt.vitals["dhcp"].rsplit(":", 1)[1])
    discover = (FIXTURES / "udhcpc_pxe_discover.bin").read_bytes()

    def go() -> dp.DhcpPacket:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(discover, ("127.0.0.1", port))
            return dp.parse(sock.recv(2048))

    offer = await asyncio.to_thread(go)
    assert offer.file == b"ipxe.efi"  # DHCP answers regardless; the refusal comes with the script
    [requested] = await events_of(registry, "BootRequested", 1)
    assert requested.data["mac"] == MAC and requested.data["vdisk"] is None


async def test_tftp_serves_the_boot_files(boot: Boot, tmp_path: Path) -> None:
    out = tmp_path / "got.efi"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sf", "--tftp-blksize", "1468", "-o", str(out),
        f"tftp://{boot.rt.vitals['tftp']}/ipxe.efi",
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert out.read_bytes() == (boot.tftp_root / "ipxe.efi").read_bytes()


async def test_tftp_transfer_is_a_span_of_the_boot(boot: Boot, registry: Registry) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # the service installed the SDK's
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dhcp_port = int(boot.rt.vitals["dhcp"].rsplit(":", 1)[1])
    discover = dp.parse((FIXTURES / "udhcpc_pxe_discover.bin").read_bytes())
    request = dp.parse((FIXTURES / "udhcpc_pxe_discover.bin").read_bytes())
    request.options[dp.OPT_MESSAGE_TYPE] = bytes((dp.REQUEST,))
    request.ciaddr = "127.0.0.1"  # the address the site's DHCP gave it (proxy mode)

    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(dp.build(discover), ("127.0.0.1", dhcp_port))
            sock.recv(2048)
            # The PXE client's REQUEST to the boot server port (4011 for real).
            sock.sendto(dp.build(request), ("127.0.0.1", boot.rt.settings.dhcp_pxe_port))
            sock.recv(2048)

    await asyncio.to_thread(go)
    await events_of(registry, "BootRequested", 1)
    traces = await BootTraces.open(boot.rt.js)
    root = await traces.peek(MAC)
    assert root is not None
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sf", "-o", "/dev/null", f"tftp://{boot.rt.vitals['tftp']}/ipxe.efi"
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    for _ in range(100):
        spans = [s for s in exporter.get_finished_spans() if s.name == "tftp ipxe.efi"]
        if spans:
            break
        await asyncio.sleep(0.05)
    [span] = spans
    trace_id, root_span_id = parse_traceparent(root["traceparent"])
    assert span.context.trace_id == trace_id and span.parent.span_id == root_span_id
    assert span.attributes["streamboot.mac"] == MAC
    assert span.attributes["streamboot.bytes"] == 70_000
    assert span.attributes["streamboot.blksize"] == 512
    assert "streamboot.error" not in span.attributes
    assert span.start_time < span.end_time


async def test_kernel_and_initrd_downloads_are_spans_of_the_boot(
    boot: Boot, registry: Registry
) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await registry.cli_json("vdisk", "import", str(image), "--name", "linux")
    await registry.cli_json("device", "add", MAC)
    await registry.cli_json("assign", MAC, "linux", "--default")
    script = await boot.script(mac=MAC, uuid=UUID)
    [kernel_url] = [x.split()[1] for x in script.splitlines() if x.startswith("kernel ")]
    [initrd_url] = [x.split()[3] for x in script.splitlines() if x.startswith("initrd ")]
    [session] = registry.app.list_sessions()
    # As iPXE loads them, on one connection; and a part of the initramfs again.
    got = await curl(kernel_url, "-o", "/dev/null", initrd_url, "-o", "/dev/null")
    assert got.returncode == 0, got.stderr
    assert (await curl("-r", "0-99", initrd_url)).returncode == 0
    # The old URL (no MAC) still serves the file, as no boot's span.
    plain = initrd_url.replace("/" + MAC.replace(":", "-"), "")
    assert (await curl(plain)).stdout.encode() == INITRD

    def downloads() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name.endswith(" download")]

    await wait_for(lambda: len(downloads()) == 3, "the boot files' spans")
    opened = await registry.app.events(type_="SessionOpened", limit=1, newest=True)
    trace_id, root_id = parse_traceparent(opened[0]["data"]["boot_traceparent"])
    by_name = {(s.name, s.attributes.get("streamboot.range")): s for s in downloads()}
    kernel = by_name[("kernel download", None)]
    whole = by_name[("initrd download", None)]
    part = by_name[("initrd download", "bytes=0-99")]
    for span in (kernel, whole, part):
        assert span.context.trace_id == trace_id and span.parent.span_id == root_id
        assert span.attributes["streamboot.mac"] == MAC and span.start_time < span.end_time
        assert span.attributes["streamboot.complete"]
    assert kernel.attributes["streamboot.bytes"] == len(KERNEL)
    assert whole.attributes["streamboot.bytes"] == len(INITRD)
    assert part.attributes["streamboot.bytes"] == 100
    assert session["session_id"] == opened[0]["data"]["session_id"]


async def test_bad_http_requests(boot: Boot) -> None:
    host, port = boot.url.removeprefix("http://").split(":")

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        return answer

    assert (await raw(b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await raw(b"POST /ipxe/boot.ipxe HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
    assert (await raw(b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
    assert (await raw(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n")).startswith(
        b"HTTP/1.1 431"
    )
    head = await raw(b"HEAD /ipxe/boot.ipxe HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert await raw(b"") == b""  # a client that connects and leaves
    assert (await raw(b"GET /ipxe/boo")).startswith(b"HTTP/1.1 400")  # cut short
    script = await boot.script(mac="not-a-mac")
    assert "bad MAC address" in script
    async with boot.http() as http:  # still serving
        assert (await http.get("/healthz")).status_code == 200


async def test_hostile_http_heads_get_an_answer_and_one_log_line(
    boot: Boot, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = boot.url.removeprefix("http://").split(":")

    async def get(*headers: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /healthz HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        )
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        return answer

    caplog.set_level("INFO", logger="streamboot.boot.http")
    assert (await get(b"Content-Length: -5")).startswith(b"HTTP/1.1 400")
    assert (await get(b"Content-Length: " + b"9" * 5000)).startswith(b"HTTP/1.1 400")
    # Just over 16 KiB with its end in the same piece.
    assert (await get(b"X: " + b"a" * (16 * 1024 - 20))).startswith(b"HTTP/1.1 431")
    # No ranges here: a Range header, however long, is ignored.
    assert (await get(b"Range: bytes=" + b"9" * 5000 + b"-")).startswith(b"HTTP/1.1 200")
    # A small body is read and dropped: the next request on the connection is answered.
    two = await get(b"Content-Length: 5\r\n\r\nhelloGET /healthz HTTP/1.1", b"Connection: close")
    assert two.startswith(b"HTTP/1.1 200") and two.count(b"HTTP/1.1 200") == 2, two
    refused = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m.split(" to ")[0] for m in refused] == ["boot http: 400"] * 2 + ["boot http: 431"]


async def test_auto_added_device_without_vdisk_is_told_so(boot: Boot, registry: Registry) -> None:
    registry.app.settings.unknown_device_policy = "auto-add"
    script = await boot.script(mac="52:54:00:00:00:07", uuid=UUID)
    assert "no vdisk is assigned" in script and "lab-001" in script
    assert "chain " in script and "sanboot" not in script  # retries once one is assigned


async def test_registry_away_means_retry(nats_url: str) -> None:
    # No registry answers on this NATS: the client is asked to wait and retry, not refused.
    from services.boot.boot_http import RETRY_BUSY_S, BootHttp
    from services.boot.handoff_store import HandoffStore
    from services.boot.http_server import Request
    from shared.contracts.registry import RegistryClient

    conn = await bus.connect(nats_url, "boot-test-no-registry")
    try:
        app = BootHttp(
            RegistryClient(conn, timeout_s=1),
            await HandoffStore.open(conn.jetstream()),
            lambda event: None,
            base_url="http://127.0.0.1:1",
        )
        answer = await app(Request("GET", "/ipxe/script", {"mac": MAC}, "test"))
        assert (
            "busy or starting" in answer.body
            and "chain http://127.0.0.1:1/ipxe/script" in answer.body
        )
        # 503 with Retry-After: iPXE's HTTP client asks again after it by itself.
        assert answer.status == 503 and answer.retry_after_s == RETRY_BUSY_S
        unknown = await app(Request("GET", "/session/redeem", {"nonce": "n" * 32}, "127.0.0.1:9"))
        assert unknown.status == 404
        # A nonce was issued, but whether its session is still live cannot be checked now:
        # spent, and the client is told to boot again.
        nonce = await app.handoffs.issue(
            {"session_id": "s", "token": "tok", "client_ip": "127.0.0.1", "nbd_host": "h",
             "nbd_port": 1, "write_cache": "server-disk", "persistence": "discard"}
        )  # fmt: skip
        away = await app(Request("GET", "/session/redeem", {"nonce": nonce}, "127.0.0.1:9"))
        assert away.status == 503
    finally:
        await conn.close()


async def test_boot_requested_survives_an_immediate_stop(boot: Boot, registry: Registry) -> None:
    port = int(boot.rt.vitals["dhcp"].rsplit(":", 1)[1])
    discover = (FIXTURES / "udhcpc_pxe_discover.bin").read_bytes()

    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(discover, ("127.0.0.1", port))
            sock.recv(2048)

    await asyncio.to_thread(go)
    boot.stopped = True
    await boot.rt.stop()  # at once: the queued announcement must still reach the log
    [requested] = await registry.app.store.read_all(types=["BootRequested"])
    assert requested.data["mac"] == MAC


async def test_a_busy_registry_means_503_retry_after(boot: Boot, registry: Registry) -> None:
    """Back-pressure (issue 28): the registry refuses the open as busy; the script request
    gets 503 with the registry's Retry-After (asked with curl), no session is opened, and
    the next ask boots."""
    await seed(registry, registry.data_dir, MAC, "win")
    registry.app.settings.registry_max_waiting_opens = 1
    url = f"{boot.url}/ipxe/script?mac={MAC}&uuid={UUID}"
    async with registry.app._lock:  # one open under way holds the only place
        first = asyncio.create_task(curl_head_body(url))
        await wait_for(lambda: registry.app._opens_in_flight == 1, "the first open")
        head, body = await curl_head_body(url)
    assert head[0].split()[1] == "503", head
    retry = [x.split(":", 1)[1].strip() for x in head if x.lower().startswith("retry-after:")]
    assert len(retry) == 1, head
    assert 1 <= int(retry[0]) <= registry.app.settings.registry_busy_retry_max_s
    assert "busy" in body and f"chain {boot.url}/ipxe/script" in body
    head, body = await first
    assert head[0].split()[1] == "200" and "sanboot" in body, body
    assert len(registry.app.projection.sessions) == 1  # the refused ask opened nothing


async def curl_head_body(url: str) -> tuple[list[str], str]:
    """GET with curl: the response head's lines and the body."""
    done = await curl("-i", url)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
    return head.split("\n"), body
