"""iPXE script generation as pure functions."""

from __future__ import annotations

from services.boot import ipxe_scripts as s
from services.boot.boot_http import normalize_mac

BASE = "http://10.0.0.1:18082"


def test_boot_script_chains_with_mac_and_uuid() -> None:
    script = s.boot_script(BASE)
    assert script.startswith("#!ipxe\n")
    assert f"chain {BASE}/ipxe/script?mac=${{mac}}&uuid=${{uuid}} || goto failed" in script
    assert script.rstrip().endswith(f"chain {BASE}/ipxe/boot.ipxe")  # retries on failure


def test_menu_has_items_default_timeout_and_choice_urls() -> None:
    vdisks = ["win11", "ubuntu", "rescue"]
    urls = {v: s.script_url(BASE, "52:54:00:12:34:56", "u-1", v) for v in vdisks}
    script = s.menu_script(
        title="choose what lab-001 boots", vdisks=vdisks, default="ubuntu", timeout_s=7,
        choice_url=urls,
    )  # fmt: skip
    lines = script.splitlines()
    assert lines[0] == "#!ipxe" and lines[1] == "menu streamboot: choose what lab-001 boots"
    assert lines[2:5] == ["item vd0 win11", "item vd1 ubuntu (default)", "item vd2 rescue"]
    assert "choose --default vd1 --timeout 7000 target || goto vd1" in lines
    assert "goto ${target}" in lines
    i = lines.index(":vd2")
    assert (
        lines[i + 1]
        == f"chain {BASE}/ipxe/script?mac=52%3A54%3A00%3A12%3A34%3A56&uuid=u-1&vdisk=rescue"
    )


def test_menu_without_a_default_uses_the_first() -> None:
    script = s.menu_script(
        title="t", vdisks=["a", "b"], default=None, timeout_s=5, choice_url={"a": "x", "b": "y"}
    )
    assert "choose --default vd0 --timeout 5000 target || goto vd0" in script


def test_sanboot_script() -> None:
    info = s.SessionInfo("win11", 3, "http://10.0.0.2:18081/s/TOKEN", "lab-001")
    script = s.sanboot_script(info, retry_url=f"{BASE}/ipxe/script?mac=x")
    assert "sanboot http://10.0.0.2:18081/s/TOKEN || goto failed" in script
    assert "echo streamboot: booting win11 version 3 as lab-001" in script
    assert script.rstrip().endswith(f"chain {BASE}/ipxe/script?mac=x")


def test_sanboot_names_the_session_on_every_live_node() -> None:
    """iPXE's multipath sanboot (docs/failover.md): the session's node first, then the
    others once each, at most MAX_SAN_PATHS; a URL that could split or expand the command
    line is left out."""
    own = "http://10.0.0.2:18081/s/TOKEN"
    others = tuple(f"http://10.0.0.{n}:18081/s/TOKEN" for n in (3, 4, 5, 6))
    info = s.SessionInfo("win11", 3, own, None, (own, others[0], "http://x/s/a b", "ftp://y/s/t",
                                                 "http://z/s/${x}", *others[1:]))  # fmt: skip
    script = s.sanboot_script(info, retry_url=f"{BASE}/ipxe/script?mac=x")
    [line] = [x for x in script.splitlines() if x.startswith("sanboot ")]
    assert line == f"sanboot {own} {' '.join(others[:3])} || goto failed"


def test_messages_refuse_or_retry() -> None:
    refused = s.message_script(["unknown machine"], wait_s=30)
    assert refused.splitlines() == [
        "#!ipxe",
        "echo streamboot: unknown machine",
        "sleep 30",
        "shell",
    ]
    retry = s.message_script(["busy"], retry_url="http://x/y", wait_s=10)
    assert retry.splitlines()[-3:] == [
        "echo retrying in 10 seconds",
        "sleep 10",
        "chain http://x/y",
    ]


def test_untrusted_text_cannot_inject_commands() -> None:
    evil = "x${net0/mac}\nshell\r;`rm`'$(id)"
    script = s.message_script([evil])
    assert "${" not in script and "\nshell\n" not in script.split("sleep")[0]
    assert len(script.splitlines()) == 4
    menu = s.menu_script(
        title=evil, vdisks=[evil], default=None, timeout_s=1, choice_url={evil: "http://x/"}
    )
    assert "${net0" not in menu and "$(" not in menu


def test_redeem_answer_is_plain_words() -> None:
    text = s.redeem_text(
        {"nbd_host": "10.0.0.2", "nbd_port": 10809, "export": "AbC-_9$(reboot)",
         "write_cache": "server-disk", "persistence": "discard", "hostname": "pc 1;x",
         "machine_id": "ab" * 16, "session_id": "s-1", "traceparent": None}
    )  # fmt: skip
    assert text.splitlines() == [
        "nbd_host=10.0.0.2", "nbd_port=10809", "export=AbC-_9__reboot_",
        "write_cache=server-disk", "persistence=discard", "hostname=pc_1_x",
        f"machine_id={'ab' * 16}", "session_id=s-1",
    ]  # fmt: skip
    # The node list keeps IPv6 endpoints' brackets, nothing more.
    nodes = s.redeem_text({"nbd_nodes": "[fd00::2]:10809,10.0.0.3:1,$(x);[y]"})
    assert nodes == "nbd_nodes=[fd00::2]:10809,10.0.0.3:1,__x__[y]\n"


def kernel_boot(**over: str) -> s.KernelBoot:
    fields = {
        "files_url": f"{BASE}/boot-files/deb/3", "server": BASE, "nonce": "N" * 32,
        "root": "UUID=1234-ab", "write_cache": "client-ram", "hostname": "pc-1",
        "machine_id": "cd" * 16, "extra_args": None, "kernel_version": "6.1.0-12-amd64",
    }  # fmt: skip
    return s.KernelBoot(**{**fields, **over})  # type: ignore[arg-type]


def test_kernel_command_line_is_the_contract_and_drops_unsafe_extra_words() -> None:
    line = s.kernel_command_line(
        kernel_boot(extra_args="console=ttyS0,115200n8  quiet ${x} a;reboot $(id) `id`")
    )
    assert line == (
        "boot=streamboot root=streamboot ip=dhcp rd.neednet=1 "
        # iPXE's own expansions: the only ${...} on the line.
        "streamboot.ip=${ip}:${gateway}:${netmask} BOOTIF=01-${mac:hexhyp} "
        f"streamboot.server={BASE} "
        f"streamboot.nonce={'N' * 32} streamboot.root=UUID=1234-ab streamboot.wc=client-ram "
        f"systemd.hostname=pc-1 systemd.machine_id={'cd' * 16} console=ttyS0,115200n8 quiet"
    )


def test_kernel_script_loads_both_files_and_gives_the_nonce_back_on_failure() -> None:
    info = s.SessionInfo("deb", 3, "http://x/s/tok", "pc-1")
    script = s.kernel_script(info, kernel_boot(), retry_url=s.script_url(BASE, "52:54:00:00:00:01"))
    assert script.startswith("#!ipxe\n") and "(kernel 6.1.0-12-amd64)" in script
    assert f"kernel {BASE}/boot-files/deb/3/vmlinuz initrd=initrd boot=streamboot" in script
    assert f"initrd --name initrd {BASE}/boot-files/deb/3/initrd || goto failed" in script
    assert "\nboot || goto failed\n" in script and "tok" not in script
    assert script.rstrip().endswith(f"&abandon={'N' * 32}")


def test_mac_normalization() -> None:
    assert normalize_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    assert normalize_mac(" 52:54:00:ab:cd:ef ") == "52:54:00:ab:cd:ef"
    for bad in ("", "52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "52:54:00:ab:cd:ef:00", "${mac}"):
        assert normalize_mac(bad) is None


def test_nbdroot_script_is_debians_own_command_line() -> None:
    boot = s.NbdRootBoot(
        files_url=f"{BASE}/boot-files/deb/3", nbdroot="10.0.0.2:10809/tok_$(id)",
        root="UUID=1234-ab", hostname="pc-1", machine_id="cd" * 16,
        extra_args="console=ttyS0 ${x}", kernel_version="6.1.0-12-amd64",
    )  # fmt: skip
    retry = s.script_url(BASE, "52:54:00:00:00:01")
    script = s.nbdroot_script(s.SessionInfo("deb", 3, "http://x/s/tok", "pc-1"), boot,
                              retry_url=retry)  # fmt: skip
    [kernel] = [x for x in script.splitlines() if x.startswith("kernel ")]
    assert kernel == (
        f"kernel {BASE}/boot-files/deb/3/vmlinuz initrd=initrd "
        "ip=${ip}::${gateway}:${netmask}:::off BOOTIF=01-${mac:hexhyp} "
        "nbdroot=10.0.0.2:10809/tok___id_ nbddev=/dev/nbd0 root=UUID=1234-ab rw "
        f"systemd.hostname=pc-1 systemd.machine_id={'cd' * 16} console=ttyS0 || goto failed"
    )
    assert "boot=streamboot" not in script and "abandon=" not in script
    assert script.endswith(f"chain {retry}\n")
    whole = s.nbdroot_command_line(boot.__class__(**{**boot.__dict__, "root": "whole"}))
    assert " root=/dev/nbd0 " in whole


def test_ibft_script_hooks_the_iscsi_disk_then_boots_the_kernel_from_http() -> None:
    iscsi = s.IscsiBoot("10.0.0.2:13260", "iqn.2026-12.io.streamboot:tok", "iqn.x:5254",
                        {"user": "pc-1", "secret": "s3cret-of-pc-1"})  # fmt: skip
    boot = s.IbftBoot(
        files_url=f"{BASE}/boot-files/deb/3", iscsi=iscsi, root="UUID=1234-ab",
        hostname="pc-1", machine_id="cd" * 16, extra_args="console=ttyS0 $(id)",
        kernel_version="6.1.0-12-amd64",
    )  # fmt: skip
    retry = s.script_url(BASE, "52:54:00:00:00:01")
    script = s.ibft_script(s.SessionInfo("deb", 3, "http://x/s/tok", "pc-1"), boot,
                           retry_url=retry)  # fmt: skip
    lines = script.splitlines()
    # The login settings and the hook (the disk and the iBFT, no boot) before the kernel.
    hook = lines.index(
        "sanhook iscsi:10.0.0.2::13260:0:iqn.2026-12.io.streamboot:tok || goto failed"
    )
    assert lines.index("set initiator-iqn iqn.x:5254") < hook
    assert lines.index("set password s3cret-of-pc-1") < hook
    [kernel] = [x for x in lines if x.startswith("kernel ")]
    assert lines.index(kernel) > hook and "sanboot" not in script
    # No portal, target or secret on the command line: the initramfs reads the iBFT.
    assert kernel == (
        f"kernel {BASE}/boot-files/deb/3/vmlinuz initrd=initrd iscsi_auto root=UUID=1234-ab rw "
        f"systemd.hostname=pc-1 systemd.machine_id={'cd' * 16} console=ttyS0 || goto failed"
    )
    assert f"initrd --name initrd {BASE}/boot-files/deb/3/initrd || goto failed" in lines
    assert script.endswith(f"chain {retry}\n") and "abandon=" not in script
    whole = s.ibft_command_line(boot.__class__(**{**boot.__dict__, "root": "whole"}))
    assert " root=/dev/sda " in whole
