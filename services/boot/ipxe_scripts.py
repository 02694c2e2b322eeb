"""iPXE scripts, as pure functions of what the registry said.

Everything the server did not write itself (names, messages) goes through :func:`text`
so a vdisk name can never inject iPXE commands or ``${...}`` expansions into a script.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:,()/@+=\[\]-]")
# Kernel command-line values and redeem answers (docs/boot.md, "Kernel-direct boot"): the
# initramfs splits and `eval`s them, so nothing but these characters.
_WORD = re.compile(r"[A-Za-z0-9._:/=,+-]+")
_WORD_UNSAFE = re.compile(r"[^A-Za-z0-9._:/=,+-]")


def text(value: object) -> str:
    """A value made safe to put on an iPXE command line (one line, no expansions)."""
    return _UNSAFE.sub("_", str(value))[:200]


def script_url(base_url: str, mac: str, uuid: str | None = None, vdisk: str | None = None) -> str:
    query = {"mac": mac, **({"uuid": uuid} if uuid else {}), **({"vdisk": vdisk} if vdisk else {})}
    return f"{base_url}/ipxe/script?{urlencode(query)}"


def boot_script(base_url: str) -> str:
    """The fixed entry script DHCP points iPXE at: chain to the per-client script.
    iPXE expands ``${mac}`` and ``${uuid}`` (the SMBIOS UUID) before fetching."""
    return (
        "#!ipxe\n"
        "echo streamboot: asking the boot server for ${mac}\n"
        f"chain {base_url}/ipxe/script?mac=${{mac}}&uuid=${{uuid}} || goto failed\n"
        ":failed\n"
        "echo streamboot: could not reach the boot server; retrying in 10 seconds\n"
        "sleep 10\n"
        f"chain {base_url}/ipxe/boot.ipxe\n"
    )


def message_script(lines: list[str], *, retry_url: str | None = None, wait_s: int = 30) -> str:
    """Show a message on the client's screen; then retry (``retry_url``) or drop to the
    iPXE shell, so someone at the machine sees why it does not boot."""
    out = ["#!ipxe", *(f"echo streamboot: {text(line)}" for line in lines)]
    if retry_url is not None:
        out += [f"echo retrying in {wait_s} seconds", f"sleep {wait_s}", f"chain {retry_url}"]
    else:
        out += [f"sleep {wait_s}", "shell"]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class SessionInfo:
    """What the client boots (from the registry's session.open reply)."""

    vdisk: str
    version: int
    http_url: str
    hostname: str | None = None
    # The same session's URL on the other live stream nodes (their order: least loaded first).
    http_nodes: tuple[str, ...] = ()


# iPXE takes every URI of a ``sanboot`` line as a path to one SAN device: it opens them
# all and reads through the first that answers; when a read fails (its node died) it
# opens them all again and goes on through one that answers, retrying for as long as any
# path may come back (src/core/sanboot.c, sandev_command/sandev_reopen). A few are enough.
MAX_SAN_PATHS = 4


def _is_url(value: str) -> bool:
    """An http(s) URL with nothing an iPXE command line would split or expand."""
    return value.startswith(("http://", "https://")) and _WORD.fullmatch(value) is not None


def sanboot_script(session: SessionInfo, *, retry_url: str) -> str:
    """Boot the vdisk over HTTP range requests; the session token is part of each URL,
    one per live stream node (the session's own first)."""
    who = f" as {text(session.hostname)}" if session.hostname else ""
    others = [u for u in session.http_nodes if u != session.http_url and _is_url(u)]
    paths = " ".join([session.http_url, *others][:MAX_SAN_PATHS])
    return (
        "#!ipxe\n"
        f"echo streamboot: booting {text(session.vdisk)} version {int(session.version)}{who}\n"
        f"sanboot {paths} || goto failed\n"
        ":failed\n"
        "echo streamboot: sanboot failed; asking again in 10 seconds\n"
        "sleep 10\n"
        f"chain {retry_url}\n"
    )


@dataclass(frozen=True)
class IscsiBoot:
    """A SAN boot over iSCSI: iPXE's initiator logs in as the device, reads the boot
    loader, and leaves the iBFT (portal, target, initiator name, CHAP) for the OS."""

    portal: str  # "host:port"
    target: str
    initiator_iqn: str
    chap: dict[str, str | None] | None = None


def iscsi_root_path(boot: IscsiBoot) -> str:
    """iPXE's iSCSI URI: iscsi:<server>:<protocol>:<port>:<lun>:<target>."""
    host, port = boot.portal.rsplit(":", 1)
    return f"iscsi:{text(host)}::{int(port)}:0:{text(boot.target)}"


def iscsi_settings(boot: IscsiBoot) -> list[str]:
    """The settings iPXE's initiator logs in with (and puts into the iBFT)."""
    out = [f"set initiator-iqn {text(boot.initiator_iqn)}"]
    chap = boot.chap or {}
    if chap.get("user") and chap.get("secret"):
        out += [f"set username {text(chap['user'])}", f"set password {text(chap['secret'])}"]
        if chap.get("reverse_user") and chap.get("reverse_secret"):
            out += [
                f"set reverse-username {text(chap['reverse_user'])}",
                f"set reverse-password {text(chap['reverse_secret'])}",
            ]
    return out


def iscsi_sanboot_script(session: SessionInfo, boot: IscsiBoot, *, retry_url: str) -> str:
    """Boot the vdisk's own boot loader over iSCSI; the OS (Windows, or Linux's open-iscsi)
    finds its disk again through the iBFT iPXE leaves behind."""
    who = f" as {text(session.hostname)}" if session.hostname else ""
    return "\n".join([
        "#!ipxe",
        f"echo streamboot: booting {text(session.vdisk)} version {int(session.version)}{who}"
        " over iSCSI",
        *iscsi_settings(boot),
        f"sanboot {iscsi_root_path(boot)} || goto failed",
        ":failed",
        "echo streamboot: iSCSI sanboot failed; asking again in 10 seconds",
        "sleep 10",
        f"chain {retry_url}",
    ]) + "\n"  # fmt: skip


def menu_script(
    *,
    title: str,
    vdisks: list[str],
    default: str | None,
    timeout_s: int,
    choice_url: dict[str, str],
) -> str:
    """An iPXE menu of the assigned vdisks with a default and a timeout; each item chains
    back to the script URL with ``vdisk=NAME`` (which records the choice)."""
    labels = {name: f"vd{i}" for i, name in enumerate(vdisks)}
    default_label = labels.get(default or "", "vd0")
    out = ["#!ipxe", f"menu streamboot: {text(title)}"]
    for name in vdisks:
        suffix = " (default)" if labels[name] == default_label else ""
        out.append(f"item {labels[name]} {text(name)}{suffix}")
    out.append(
        f"choose --default {default_label} --timeout {int(timeout_s) * 1000} target "
        f"|| goto {default_label}"
    )
    out.append("goto ${target}")
    for name in vdisks:
        out += [f":{labels[name]}", f"chain {choice_url[name]}"]
    return "\n".join(out) + "\n"


def word(value: object) -> str:
    """A value made safe for the kernel command line and the redeem answer."""
    return _WORD_UNSAFE.sub("_", str(value))[:200]


def kernel_args_words(args: str | None) -> list[str]:
    """An operator's extra kernel arguments, word by word, without the unsafe ones (the
    registry refuses them when they are set; this holds the line whatever it said)."""
    return [w for w in (args or "").split() if _WORD.fullmatch(w) and len(w) <= 200]


@dataclass(frozen=True)
class KernelBoot:
    """A kernel-direct boot: where the files are and what the command line says."""

    files_url: str  # <boot-http>/boot-files/<vdisk>/<version>
    server: str  # the boot service's base URL, for the initramfs
    nonce: str
    root: str  # UUID=..., PARTUUID=... or whole
    write_cache: str
    hostname: str
    machine_id: str
    extra_args: str | None = None
    kernel_version: str | None = None


# iPXE expands these when it runs the `kernel` line: the address its own DHCP got and the
# booting NIC (pxelinux's BOOTIF form), so the initramfs need not ask DHCP again (dracut,
# which reads no streamboot.ip=, still does: ip=dhcp).
IPXE_ADDRESS_WORDS = ("streamboot.ip=${ip}:${gateway}:${netmask}", "BOOTIF=01-${mac:hexhyp}")


def kernel_command_line(boot: KernelBoot) -> str:
    words = [
        "boot=streamboot",
        "root=streamboot",
        "ip=dhcp",
        "rd.neednet=1",
        *IPXE_ADDRESS_WORDS,
        f"streamboot.server={word(boot.server)}",
        f"streamboot.nonce={word(boot.nonce)}",
        f"streamboot.root={word(boot.root)}",
        f"streamboot.wc={word(boot.write_cache)}",
        f"systemd.hostname={word(boot.hostname)}",
        f"systemd.machine_id={word(boot.machine_id)}",
        *kernel_args_words(boot.extra_args),
    ]
    return " ".join(words)


def kernel_script(session: SessionInfo, boot: KernelBoot, *, retry_url: str) -> str:
    """Load the version's kernel and initramfs over HTTP and start the kernel, whose
    initramfs redeems the nonce and attaches the root over NBD. When loading fails, the
    retry gives the nonce back (``abandon=``): its session closes and a new one opens."""
    return _load_and_boot(
        session, boot.files_url, boot.kernel_version, kernel_command_line(boot),
        f"{retry_url}&abandon={word(boot.nonce)}",
    )  # fmt: skip


def _load_and_boot(
    session: SessionInfo,
    files_url: str,
    kernel_version: str | None,
    args: str,
    retry_url: str,
    *,
    before: Sequence[str] = (),
) -> str:
    who = f" as {text(session.hostname)}" if session.hostname else ""
    kernel = f" (kernel {text(kernel_version)})" if kernel_version else ""
    return (
        "#!ipxe\n"
        f"echo streamboot: booting {text(session.vdisk)} version {int(session.version)}{who}"
        f"{kernel}\n"
        + "".join(f"{line}\n" for line in before)
        + f"kernel {files_url}/vmlinuz initrd=initrd {args} || goto failed\n"
        f"initrd --name initrd {files_url}/initrd || goto failed\n"
        "boot || goto failed\n"
        ":failed\n"
        "echo streamboot: loading the kernel failed; asking again in 10 seconds\n"
        "sleep 10\n"
        f"chain {retry_url}\n"
    )


@dataclass(frozen=True, kw_only=True)
class ClientlessBoot:
    """A kernel-direct boot of an image without the streamboot client: its files, its root
    and the device's identity, whatever carries the root."""

    files_url: str
    root: str  # UUID=..., PARTUUID=... or whole
    hostname: str
    machine_id: str
    extra_args: str | None = None
    kernel_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class NbdRootBoot(ClientlessBoot):
    """The root through Debian's own initramfs NBD root (nbd-client's
    ``scripts/local-top/nbd``)."""

    nbdroot: str  # HOST:PORT/EXPORT (the session token)


def nbdroot_command_line(boot: NbdRootBoot) -> str:
    """Debian's ``nbdroot=`` form: the address iPXE got (initramfs-tools' static ``ip=`` on
    the BOOTIF NIC), the export on /dev/nbd0, the root found in it mounted read-write."""
    words = [
        "ip=${ip}::${gateway}:${netmask}:::off",
        "BOOTIF=01-${mac:hexhyp}",
        f"nbdroot={word(boot.nbdroot)}",
        "nbddev=/dev/nbd0",
        *root_and_identity_words(boot, whole_disk="/dev/nbd0"),
    ]
    return " ".join(words)


def root_and_identity_words(boot: ClientlessBoot, *, whole_disk: str) -> list[str]:
    """The end of a client-less command line: the root (the whole disk's device when the
    filesystem fills it) read-write, the device's identity and its operator's arguments."""
    root = whole_disk if boot.root == "whole" else word(boot.root)
    return [
        f"root={root}",
        "rw",
        f"systemd.hostname={word(boot.hostname)}",
        f"systemd.machine_id={word(boot.machine_id)}",
        *kernel_args_words(boot.extra_args),
    ]


def nbdroot_script(session: SessionInfo, boot: NbdRootBoot, *, retry_url: str) -> str:
    """Load the kernel and initramfs and boot with Debian's nbdroot= (no nonce: a retry
    waits for the session to close like any other)."""
    return _load_and_boot(
        session, boot.files_url, boot.kernel_version, nbdroot_command_line(boot), retry_url
    )


@dataclass(frozen=True, kw_only=True)
class IbftBoot(ClientlessBoot):
    """The root over iSCSI through the iBFT, the path Windows takes: iPXE logs in and leaves
    the iBFT (``sanhook``), then starts the version's kernel, whose initramfs (Debian's
    open-iscsi) logs in again from the table."""

    iscsi: IscsiBoot


def ibft_command_line(boot: IbftBoot) -> str:
    """open-iscsi's ``iscsi_auto``: the initramfs configures the NIC and logs in from the
    iBFT alone (no portal, target or secret on the command line, which /proc/cmdline would
    show to every user of the booted OS); the root found on the disk mounted read-write."""
    return " ".join(["iscsi_auto", *root_and_identity_words(boot, whole_disk="/dev/sda")])


def ibft_script(session: SessionInfo, boot: IbftBoot, *, retry_url: str) -> str:
    """Register the iSCSI disk and the iBFT without booting from it, then load and start
    the kernel over HTTP: the OS's own initiator finds its root through the table."""
    hook = [*iscsi_settings(boot.iscsi), f"sanhook {iscsi_root_path(boot.iscsi)} || goto failed"]
    return _load_and_boot(
        session, boot.files_url, boot.kernel_version, ibft_command_line(boot), retry_url,
        before=hook,
    )  # fmt: skip


REDEEM_KEYS = (
    "mac", "nbd_host", "nbd_port", "nbd_nodes", "export", "write_cache", "persistence",
    "hostname", "machine_id", "session_id", "traceparent",
)  # fmt: skip


# nbd_nodes= keeps the brackets of IPv6 endpoints (each one checked before it is handed
# out), and room for eight of them.
_NODES_UNSAFE = re.compile(r"[^A-Za-z0-9._:,\[\]-]")


def redeem_text(answer: dict[str, object]) -> str:
    """The redeem answer: ``key=value`` lines the initramfs reads (docs/boot.md)."""
    return "".join(
        f"{k}={_redeem_value(k, answer[k])}\n"
        for k in REDEEM_KEYS
        if answer.get(k) not in (None, "")
    )


def _redeem_value(key: str, value: object) -> str:
    if key == "nbd_nodes":
        return _NODES_UNSAFE.sub("_", str(value))[:400]
    return word(value)
