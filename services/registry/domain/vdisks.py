"""vdisk decisions: publish a version, promote, roll back, change policy, remove; and which
version a boot gets.

Versions form a line: version N's parent is N-1 and its layer is a delta over the chain
1..N-1 (version 1 is the base image). Stages: ``maintenance`` (being prepared: booted only
by maintenance sessions), ``test`` (booted by testers), ``production`` (by everyone else).
A maintenance session boots the latest version read-write, one device per vdisk at a time;
its writes are kept and become the next version when committed. The current
production version is the last entry of the vdisk's production history; a rollback pops it
and withdraws that version (no new boot picks it; running sessions keep it).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from services.registry.domain.errors import conflict, invalid, not_found, refused
from services.registry.projection import Projection, Record
from shared.events import (
    BootFilesScanned,
    Event,
    VdiskChainMerged,
    VdiskCreated,
    VdiskPolicyChanged,
    VdiskRemoved,
    VdiskRolledBack,
    VdiskVersionPromoted,
    VdiskVersionPublished,
)
from shared.identity import check_name
from shared.layer_paths import LayerPathError, check_layer_name

STAGE_ORDER = {"maintenance": 0, "test": 1, "production": 2}
MODES = ("standard", "private")
# The registry's own vdisk dir, always there; other stores are named in the settings.
LOCAL_STORE = "local"
WRITE_CACHES = ("server-ram", "server-disk", "client-ram", "client-disk")
PERSISTENCES = ("discard", "keep")
BOOT_METHODS = ("auto", "kernel", "sanboot", "sanboot-iscsi", "nbdroot", "iscsi-ibft")
# Kernel-direct without the streamboot client: the image's own initramfs mounts the disk
# read-write (Debian's nbdroot=, open-iscsi through the iBFT).
CLIENTLESS = ("nbdroot", "iscsi-ibft")
_KERNEL_VERSION = re.compile(r"^[A-Za-z0-9._+~-]{1,100}$")


def get_vdisk(p: Projection, name: str) -> Record:
    vd = p.vdisks.get(name)
    if vd is None:
        known = ", ".join(sorted(p.vdisks)) or "none"
        raise not_found(f"no vdisk named {name!r} (known: {known})")
    return vd


def latest_version(vd: Record) -> int:
    return max(vd["versions"], default=0)


def production_version(vd: Record) -> int | None:
    history = vd["production_history"]
    return history[-1] if history else None


def publish(
    p: Projection,
    name: str,
    *,
    version: int,
    stage: str | None,
    path: str,
    size: int,
    checksum: str,
    changed_blocks: int,
    block_size: int,
    mode: str = "standard",
    write_cache: str = "server-disk",
    write_cache_persistence: str = "discard",
    store: str | None = None,
    stores: Collection[str] = (LOCAL_STORE,),
    boot: dict[str, Any] | None = None,
) -> list[Event]:
    """A new version (and the vdisk itself, for version 1), with what it holds to boot
    kernel-direct (``boot``: BootFilesScanned's data, checked by the caller). The first version goes straight
    to production (there is nothing to boot otherwise); later ones default to maintenance."""
    check_name(name)
    events: list[Event] = []
    vd = p.vdisks.get(name)
    expected = latest_version(vd) + 1 if vd else 1
    if version != expected:
        raise conflict(
            f"vdisk {name!r}: version {version} cannot be published, the next version is "
            f"{expected} (another import ran meanwhile? import again)"
        )
    if stage is None:
        stage = "production" if version == 1 else "maintenance"
    if stage not in STAGE_ORDER:
        raise invalid(f"unknown stage {stage!r}: maintenance, test or production")
    if size <= 0:
        raise invalid(f"vdisk {name!r}: an image of {size} bytes is empty")
    try:
        check_layer_name(name, path)
    except LayerPathError as exc:
        raise invalid(str(exc)) from None
    if vd is None:
        _check_policy(mode, write_cache, write_cache_persistence)
        _check_keepable(mode, write_cache, write_cache_persistence)
        _check_store(store, stores)
        events.append(
            VdiskCreated(
                name=name,
                size=size,
                mode=mode,  # type: ignore[arg-type]
                write_cache=write_cache,  # type: ignore[arg-type]
                write_cache_persistence=write_cache_persistence,  # type: ignore[arg-type]
                store=store or LOCAL_STORE,
            )
        )
    elif store is not None and store != vd["store"]:
        raise invalid(
            f"vdisk {name!r} is in store {vd['store']!r}; move it with `vdisk set --store`"
        )
    events.append(
        VdiskVersionPublished(
            name=name,
            version=version,
            parent=version - 1 if version > 1 else None,
            stage=stage,  # type: ignore[arg-type]
            path=path,
            size=size,
            checksum=checksum,
            changed_blocks=changed_blocks,
            block_size=block_size,
        )
    )
    if boot is not None:
        events.append(BootFilesScanned(name=name, version=version, **boot))
    return events


def promote(
    p: Projection, name: str, version: int, to: str, *, requires_test: bool = False
) -> list[Event]:
    """A version moved forward to ``to``; ``requires_test``: production only from test."""
    vd = get_vdisk(p, name)
    ver = vd["versions"].get(version)
    if ver is None:
        raise not_found(f"vdisk {name!r} has no version {version} (latest: {latest_version(vd)})")
    if to not in ("test", "production"):
        raise invalid(f"cannot promote to {to!r}: only to test or production")
    if ver["retired"]:
        raise conflict(f"vdisk {name!r} version {version} was merged away and cannot be booted")
    if to == "production" and production_version(vd) == version:
        raise conflict(f"vdisk {name!r} version {version} is already the production version")
    if STAGE_ORDER[to] < STAGE_ORDER[ver["stage"]] and not ver["withdrawn"]:
        raise invalid(
            f"vdisk {name!r} version {version} is in {ver['stage']}; promotion only moves forward"
        )
    if to == ver["stage"] and not ver["withdrawn"]:
        raise conflict(f"vdisk {name!r} version {version} is already in {to}")
    if requires_test and to == "production" and ver["stage"] == "maintenance":
        raise refused(
            f"vdisk {name!r} version {version} was never tested: the policy requires the test "
            f"stage first (`vdisk promote {name} {version} --to test`, then production)"
        )
    return [VdiskVersionPromoted(name=name, version=version, stage=to, previous_stage=ver["stage"])]  # type: ignore[arg-type]


def rollback(p: Projection, name: str) -> list[Event]:
    vd = get_vdisk(p, name)
    history = vd["production_history"]
    if len(history) < 2:
        raise conflict(
            f"vdisk {name!r} has no earlier production version to roll back to "
            f"(production history: {history or 'empty'})"
        )
    if vd["versions"][history[-2]]["retired"]:
        raise conflict(
            f"vdisk {name!r}: version {history[-2]} was merged into a later version's base "
            "(`vdisk merge`) and cannot be booted again"
        )
    return [VdiskRolledBack(name=name, from_version=history[-1], to_version=history[-2])]


def set_policy(
    p: Projection,
    name: str,
    *,
    mode: str | None = None,
    write_cache: str | None = None,
    write_cache_persistence: str | None = None,
    store: str | None = None,
    stores: Collection[str] = (LOCAL_STORE,),
    boot_method: str | None = None,
    kernel: str | None = None,
) -> list[Event]:
    vd = get_vdisk(p, name)
    _check_policy(mode, write_cache, write_cache_persistence)
    _check_keepable(
        mode or vd["mode"],
        write_cache or vd["write_cache"],
        write_cache_persistence or vd["write_cache_persistence"],
    )
    _check_clientless(
        boot_method or vd.get("boot_method", "auto"), write_cache or vd["write_cache"]
    )
    _check_store(store, stores)
    if boot_method is not None and boot_method not in BOOT_METHODS:
        raise invalid(f"unknown boot method {boot_method!r}: {', '.join(BOOT_METHODS)}")
    if kernel and not _KERNEL_VERSION.match(kernel):
        raise invalid(f"invalid kernel version {kernel!r} (as in vmlinuz-VERSION)")
    if mode == "private" and vd["mode"] != "private":
        users = {s["mac"] for s in p.live_boots_of_vdisk(name)}
        if len(users) > 1:
            raise conflict(
                f"vdisk {name!r} is used by {len(users)} live sessions; a private vdisk "
                "serves one device"
            )
    if all(
        v is None for v in (mode, write_cache, write_cache_persistence, store, boot_method, kernel)
    ):
        raise invalid(
            "nothing to change: give a mode, write cache, persistence, store, boot method or kernel"
        )
    return [
        VdiskPolicyChanged(
            name=name,
            mode=mode,  # type: ignore[arg-type]
            write_cache=write_cache,  # type: ignore[arg-type]
            write_cache_persistence=write_cache_persistence,  # type: ignore[arg-type]
            store=store,
            boot_method=boot_method,  # type: ignore[arg-type]
            kernel=kernel,
        )
    ]


def remove(p: Projection, name: str) -> list[Event]:
    get_vdisk(p, name)
    live = p.live_sessions_of_vdisk(name)
    if live:
        macs = ", ".join(sorted(s["mac"] for s in live))
        raise conflict(
            f"vdisk {name!r} is in use by {len(live)} live session(s) ({macs}); "
            "close them before removing it"
        )
    return [VdiskRemoved(name=name)]


def check_commit(p: Projection, name: str) -> Record:
    """The closed maintenance session whose writes make the next version."""
    vd = get_vdisk(p, name)
    live = [s for s in p.live_sessions_of_vdisk(name) if s.get("maintenance")]
    if live:
        raise conflict(
            f"vdisk {name!r} is still in maintenance by live session {live[0]['session_id']}; "
            "shut the client down (or `streamboot session close`) first"
        )
    last = vd.get("last_maintenance")
    if last is None:
        raise conflict(
            f"vdisk {name!r} has no finished maintenance session "
            f"(`streamboot session open MAC --vdisk {name} --maintenance`)"
        )
    if last["version"] != latest_version(vd):
        raise conflict(
            f"vdisk {name!r} moved on to version {latest_version(vd)} since its maintenance "
            f"session on version {last['version']}: its writes cannot be committed"
        )
    return last


def _check_policy(mode: str | None, cache: str | None, persistence: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise invalid(f"unknown image mode {mode!r}: {' or '.join(MODES)}")
    if cache is not None and cache not in WRITE_CACHES:
        raise invalid(f"unknown write cache {cache!r}: {', '.join(WRITE_CACHES)}")
    if persistence is not None and persistence not in PERSISTENCES:
        raise invalid(f"unknown write-cache persistence {persistence!r}: discard or keep")


def _check_keepable(mode: str | None, cache: str | None, persistence: str | None) -> None:
    """A policy that says the writes are kept must be able to keep them: a client-ram
    write cache lives in the client's memory and is gone at every power-off."""
    if cache != "client-ram":
        return
    if persistence == "keep" or mode == "private":
        said = "persistence keep" if persistence == "keep" else "a private vdisk (which keeps)"
        raise invalid(
            f"a client-ram write cache cannot keep writes across a reboot ({said}): use "
            "client-disk (a local partition labelled streamboot-wc) or a server-side write "
            "cache (server-disk) to keep them, or persistence discard"
        )


def _check_clientless(method: str, cache: str) -> None:
    """Debian's nbdroot= and open-iscsi mount the disk read-write and know no overlay: the
    writes must go to a server-side write cache."""
    if method in CLIENTLESS and cache.startswith("client-"):
        raise invalid(
            f"boot method {method} (Debian's own initramfs, without the streamboot client) "
            f"cannot use a {cache} write cache: it mounts the disk read-write, so only "
            "server-ram or server-disk; install the client package for client-side caches"
        )


def _check_store(store: str | None, stores: Collection[str]) -> None:
    if store is not None and store not in stores:
        raise invalid(
            f"unknown store {store!r}: configured are {', '.join(sorted(stores))} "
            "(STREAMBOOT_CACHE_STORES names the others)"
        )


# --- what a boot gets ------------------------------------------------------------------


def boot_version(vd: Record, *, tester: bool, maintenance: bool) -> int:
    """The version a device boots: a maintenance session the latest version (its writes
    become the next version, a delta over it: see ``streamboot vdisk commit``); testers the
    newest test version newer than production; others production."""
    versions = vd["versions"]
    if maintenance:
        return latest_version(vd)
    prod = production_version(vd)
    if tester:
        tests = [
            n
            for n, v in versions.items()
            if v["stage"] == "test" and not v["withdrawn"] and not v["retired"] and n > (prod or 0)
        ]
        if tests:
            return max(tests)
    if prod is None:
        raise conflict(
            f"vdisk {vd['name']!r} has no production version to boot "
            "(promote one with `streamboot vdisk promote`)"
        )
    return prod


def boot_plan(vd: Record, version: int) -> Record:
    """How a session of ``version`` boots: ``kernel`` (kernel-direct, with the kernel
    version and the root filesystem found at publish time) or ``sanboot`` (the image's own
    bootloader) with the reason; a vdisk that must boot kernel-direct but cannot is a
    conflict (told on the client's screen)."""
    boot = vd["versions"][version].get("boot") or {}
    method = vd.get("boot_method", "auto")
    if method in ("sanboot", "sanboot-iscsi"):
        return {"method": method, "reason": f"the vdisk's boot method is {method}"}
    if boot.get("kernel_version"):
        if method in ("auto", "kernel"):
            refuse_without_client(vd["name"], version, boot)
        return {
            # nbdroot, iscsi-ibft: kernel-direct for an image without the streamboot client.
            "method": method if method in CLIENTLESS else "kernel",
            "kernel_version": boot["kernel_version"],
            "root": boot.get("root") or "whole",
        }
    why = boot.get("problem") or "its boot files were not looked for when it was published"
    if method in ("kernel", *CLIENTLESS):
        raise conflict(
            f"vdisk {vd['name']!r} version {version} must boot kernel-direct but cannot: {why}"
        )
    return {"method": "sanboot", "reason": why}


def refuse_without_client(name: str, version: int, boot: Record) -> None:
    """A kernel-direct boot whose initramfs has no streamboot client would stop inside it:
    the client's screen says what is missing instead, and no session opens."""
    client, kernel = boot.get("initramfs_client"), boot["kernel_version"]
    if client == "none":
        raise conflict(
            f"vdisk {name!r} version {version}: the initramfs of kernel {kernel} has no "
            "streamboot client; install streamboot-client in the image and rebuild its "
            "initramfs (docs/clients.md), or set the boot method sanboot if it boots itself"
        )
    if client == "nbdroot":
        raise conflict(
            f"vdisk {name!r} version {version}: the initramfs of kernel {kernel} has only "
            "Debian's NBD root, not the streamboot client: `vdisk set --boot-method nbdroot`, "
            "or install streamboot-client in the image"
        )


def chain(vd: Record, version: int) -> list[str]:
    """The layer paths (store-relative) of a version, oldest first."""
    return list(vd["versions"][version]["layers"])


def merge_target(p: Projection, name: str, upto: int | None) -> int:
    """The version whose chain a merge writes out as one base (default: production), or
    why not: a version newer than production would retire the one devices boot."""
    vd = get_vdisk(p, name)
    if vd["store"] != LOCAL_STORE:
        raise invalid(
            f"vdisk {name!r} is in store {vd['store']!r}: merges run on the registry's local "
            "store only (merge there, then copy the files)"
        )
    prod = production_version(vd)
    version = prod if upto is None else upto
    if version is None or version not in vd["versions"]:
        raise not_found(f"vdisk {name!r} has no version {version} (latest: {latest_version(vd)})")
    ver = vd["versions"][version]
    if ver["retired"]:
        raise conflict(f"vdisk {name!r} version {version} was merged away: nothing to merge")
    if prod is not None and version > prod:
        raise conflict(
            f"vdisk {name!r}: merging up to version {version} would retire production "
            f"version {prod}, which devices boot; promote {version} first or merge up to {prod}"
        )
    if len(ver["layers"]) < 2:
        raise conflict(
            f"vdisk {name!r} version {version} is already one layer ({ver['layers'][0]}): "
            "nothing to merge"
        )
    return version


def merge(p: Projection, name: str, upto: int, base: str, checksum: str) -> list[Event]:
    """Versions ``upto`` and later read from ``base`` (the chain of ``upto`` written out,
    whose sha256 the caller checked against the version's); earlier ones retire."""
    version = merge_target(p, name, upto)
    vd = p.vdisks[name]
    ver = vd["versions"][version]
    if checksum != ver["checksum"]:
        raise conflict(
            f"vdisk {name!r}: the merged base of version {version} reads {checksum}, "
            f"not the version's {ver['checksum']}: not published"
        )
    try:
        check_layer_name(name, base)
    except LayerPathError as exc:
        raise invalid(str(exc)) from None
    old = ver["layers"]
    layers: dict[str, list[str]] = {}
    for n, v in sorted(vd["versions"].items()):
        if n >= version:
            if v["layers"][: len(old)] != old:
                raise conflict(f"vdisk {name!r}: version {n} is not over version {version}'s chain")
            layers[str(n)] = [base, *v["layers"][len(old) :]]
    kept = {x for ls in layers.values() for x in ls}
    read_before = {x for n, v in vd["versions"].items() if n <= version for x in v["layers"]}
    return [
        VdiskChainMerged(
            name=name,
            upto=version,
            base=base,
            checksum=checksum,
            layers=layers,
            retired=sorted(
                n for n, v in vd["versions"].items() if n < version and not v["retired"]
            ),
            superseded=sorted(read_before - kept),
        )
    ]
