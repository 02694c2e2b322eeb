"""`streamboot vdisk ...`: import images (new vdisks or new versions), versions, promote,
roll back, policy, remove.

`vdisk import` stages the new layer itself, straight into the registry's vdisk store (the
CLI must run on the registry's machine, as in the embedded default; see docs/registry.md),
then registers it through the API, which moves it into place and appends the events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shared import vdisk_store
from shared.identity import check_name
from streamboot.commands import DataDirOption
from streamboot.job_progress import reporting
from streamboot.registry_api import (
    EXIT_UNREACHABLE,
    ClientError,
    RegistryClient,
    cli_errors,
    print_result,
    run,
)

if TYPE_CHECKING:
    from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, help="vdisks (disk images) and their versions.")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(stderr=True)
out = Console(soft_wrap=True)

# A new vdisk's policy (import, build-debian).
NewModeOption = Annotated[str, typer.Option(help="new vdisk: standard|private")]
NewWriteCacheOption = Annotated[
    str, typer.Option(help="new vdisk: server-ram|server-disk|client-ram|client-disk")
]
NewPersistenceOption = Annotated[str, typer.Option(help="new vdisk: discard|keep")]
STORE_HELP = (
    "where stream and cache nodes read the layers: local (this registry's vdisk dir) or a "
    "store named in STREAMBOOT_CACHE_STORES holding the same <vdisk>/<layer> files"
)
PHASES = vdisk_store.PHASES


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def show_vdisk(v: dict[str, Any]) -> None:
    out.print(
        f"[bold]{v['name']}[/]  {_gib(v['size'])}  mode {v['mode']}, write cache "
        f"{v['write_cache']} ({v['write_cache_persistence']}), store {v['store']}"
    )
    out.print(
        f"  versions: latest {v['latest_version']}, production {v['production_version'] or '-'}"
        f"; live sessions {v['live_sessions']}"
    )
    if "chain_length" in v:
        space = (
            f", layers take {_gib(v['layers_bytes'])}" if v.get("layers_bytes") is not None else ""
        )
        out.print(
            f"  chain: {v['chain_length']} layer(s) for the latest version, "
            f"{v['production_chain_length']} for production{space}"
        )
        if v.get("superseded_layers"):
            out.print(
                f"  merged away, removed once no session reads them: "
                f"{', '.join(v['superseded_layers'])} ({_gib(v.get('superseded_bytes') or 0)})"
            )
    kernel = f", kernel {v['kernel']} (operator's pick)" if v.get("kernel") else ""
    out.print(f"  boot method {v.get('boot_method', 'auto')}{kernel}")
    if "version" in v:
        ver = v["version"]
        out.print(
            f"  published version {ver['version']} ({ver['stage']}): {ver['changed_blocks']} "
            f"blocks of {ver['block_size']} bytes, {ver['checksum']}"
        )
        show_boot(ver["version"], ver.get("boot"), v.get("boot_method", "auto"))
    else:
        for n, boot in (v.get("boot") or {}).items():
            show_boot(int(n), boot, v.get("boot_method", "auto"))


def show_boot(version: int, boot: dict[str, Any] | None, method: str) -> None:
    """What a version holds to boot kernel-direct, and so how it boots."""
    if not boot:
        return
    seen = ", ".join(boot.get("kernels") or []) or "none"
    if boot.get("kernel_version"):
        how = (
            "kernel-direct with Debian's nbdroot= (no streamboot client)"
            if method == "nbdroot"
            else "kernel-direct, the root over iSCSI through the iBFT (no streamboot client)"
            if method == "iscsi-ibft"
            else "kernel-direct"
            if not method.startswith("sanboot")
            else f"{method} (the vdisk's boot method)"
        )
        out.print(
            f"  version {version}: boots {how}: kernel {boot['kernel_version']} "
            f"({_gib(boot.get('kernel_size', 0))}, initramfs "
            f"{_gib(boot.get('initrd_size', 0))}, {boot.get('chosen_by')}), root "
            f"{boot.get('root')}; kernels seen: {seen}"
        )
    else:
        out.print(
            f"  version {version}: boots by sanboot (the image's own bootloader): "
            f"{boot.get('problem')}; kernels seen: {seen}"
        )


def show_vdisks(vdisks: list[dict[str, Any]]) -> None:
    table = Table("name", "size", "mode", "write cache", "latest", "production", "sessions")
    for v in vdisks:
        table.add_row(
            v["name"], _gib(v["size"]), v["mode"],
            f"{v['write_cache']} ({v['write_cache_persistence']})",
            str(v["latest_version"]), str(v["production_version"] or "-"), str(v["live_sessions"]),
        )  # fmt: skip
    out.print(table)


def show_versions(versions: list[dict[str, Any]]) -> None:
    table = Table("version", "stage", "size", "changed blocks", "checksum", "")
    for v in versions:
        flag = "current production" if v["current_production"] else ""
        flag = "withdrawn" if v["withdrawn"] else flag
        table.add_row(
            str(v["version"]), v["stage"], _gib(v["size"]), str(v["changed_blocks"]),
            v["checksum"][:23] + "…", flag,
        )  # fmt: skip
    out.print(table)


@contextmanager
def progress_bar(quiet: bool) -> Iterator[vdisk_store.Progress]:
    """A rich progress bar per phase (on a terminal, without --json)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=console, disable=quiet or not console.is_terminal,
    ) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        yield progress


def register(
    client: RegistryClient, root: Path, staged: vdisk_store.StagedVersion, **extra: Any
) -> Any:
    """Hand a staged version to the registry, which moves it into place or refuses it;
    either way no staging dir is left."""
    for warning in staged.boot_warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    body = {
        "boot": staged.boot,
        "version": staged.version,
        "staging": staged.staging,
        "layer": staged.layer,
        "size": staged.size,
        "checksum": staged.checksum,
        "changed_blocks": staged.changed_blocks,
        "block_size": staged.block_size,
        **extra,
    }
    try:
        return client.post(f"/vdisks/{staged.name}/versions", body)
    finally:
        vdisk_store.discard_staged(root, staged.name, staged.staging)


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="raw or qcow2 (any qemu-img format) image")],
    data_dir: DataDirOption,
    name: Annotated[str, typer.Option(help="vdisk name; an existing one gets a new version")],
    stage: Annotated[
        str | None,
        typer.Option(
            help="maintenance|test|production (default: production for a new vdisk, maintenance for a new version)"
        ),
    ] = None,
    mode: NewModeOption = "standard",
    write_cache: NewWriteCacheOption = "server-disk",
    persistence: NewPersistenceOption = "discard",
    store: Annotated[str | None, typer.Option(help=STORE_HELP)] = None,
    as_json: JsonOption = False,
) -> None:
    """Import a disk image as a new vdisk, or as a new version (a delta) of an existing one."""
    import_image(path, data_dir, name, stage, mode, write_cache, persistence, as_json, store)


def import_image(
    path: Path,
    data_dir: Path,
    name: str,
    stage: str | None,
    mode: str,
    write_cache: str,
    persistence: str,
    as_json: bool,
    store: str | None = None,
) -> None:
    with cli_errors(as_json):
        check_name(name)
        vdisk_store.image_format(path)  # a missing file or a non-image fails before anything
        client = RegistryClient.from_data_dir(data_dir)
        root = Path(client.get("/registry/status")["vdisk_root"])
        try:
            current = client.get(f"/vdisks/{name}")
            version, chain = (
                current["latest_version"] + 1,
                [Path(p) for p in current["latest_layers"]],
            )
            kernel = current.get("kernel")
        except ClientError as exc:
            if exc.kind != "not_found":
                raise
            version, chain, kernel = 1, [], None
        # The registry shows the import's progress too (the console's vdisks page).
        with reporting(client, name) as (report, end):
            with progress_bar(as_json) as progress:

                def both(phase: str, done: int, total: int) -> None:
                    progress(phase, done, total)
                    report(phase, done, total)

                staged = vdisk_store.stage_version(
                    root, name, path, version, chain, both, kernel=kernel
                )
            report("publish", 0, 1)
            result = register(
                client, root, staged, stage=stage, mode=mode, write_cache=write_cache,
                write_cache_persistence=persistence, store=store,
            )  # fmt: skip
            end(version=staged.version)
    print_result(result, as_json, show_vdisk)


@app.command("build-demo")
def build_demo(
    name: Annotated[str, typer.Argument(help="name of the new vdisk (or a new version of it)")],
    data_dir: DataDirOption,
    write_cache: Annotated[
        str, typer.Option(help="server-ram|server-disk|client-ram|client-disk")
    ] = "server-disk",
    size_mib: Annotated[int, typer.Option(help="image size")] = 64,
    as_json: JsonOption = False,
) -> None:
    """Build a small bootable Linux (Debian kernel, busybox, syslinux, the NBD hand-off) and
    import it, so a new user can PXE-boot a machine or VM within minutes (kernel-direct:
    the registry finds its kernel like any image's)."""
    import tempfile

    from streamboot.demo.image import DemoBuildError, build_demo_image, default_cache_dir

    with cli_errors(as_json):
        check_name(name)
        cache = default_cache_dir()
        with tempfile.TemporaryDirectory(prefix="streamboot-demo-") as tmp:
            image = Path(tmp) / f"{name}.img"
            if not as_json:
                console.print("building the demo image...")
            try:
                build_demo_image(image, name=name, size_mib=size_mib, cache_dir=cache)
            except DemoBuildError as exc:
                raise ClientError(str(exc), "invalid") from exc
            import_image(image, data_dir, name, None, "standard", write_cache, "discard", as_json)


@app.command("build-debian")
def build_debian(
    name: Annotated[str, typer.Argument(help="name of the new vdisk (or a new version of it)")],
    data_dir: DataDirOption,
    suite: Annotated[str, typer.Option(help="Debian suite")] = "bookworm",
    size: Annotated[str, typer.Option(help="image size (e.g. 4G, 8192M)")] = "4G",
    packages: Annotated[
        str, typer.Option(help="more Debian packages, comma separated (e.g. openssh-server)")
    ] = "",
    mirror: Annotated[str, typer.Option(help="Debian mirror")] = "http://deb.debian.org/debian",
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="where the debootstrapped system is kept (default ~/.cache/streamboot)"),
    ] = None,
    mode: NewModeOption = "standard",
    write_cache: NewWriteCacheOption = "server-disk",
    persistence: NewPersistenceOption = "discard",
    as_json: JsonOption = False,
) -> None:
    """Build a real Debian (systemd, a kernel, the streamboot client, a serial console) with
    debootstrap and import it: PXE-booted kernel-direct, it reaches multi-user. Needs root."""
    import tempfile

    from streamboot.debian_image import DebianBuildError, build_debian_image, require_build_tools

    def say(message: str) -> None:
        if not as_json:
            console.print(message)

    with cli_errors(as_json):
        check_name(name)
        try:
            require_build_tools()
        except DebianBuildError as exc:
            raise ClientError(str(exc), "invalid") from exc
        client = RegistryClient.from_data_dir(data_dir)  # fails early when nothing runs
        client.get("/registry/status")
        # Next to the data, not in /tmp (which may be RAM): the image is gigabytes.
        with tempfile.TemporaryDirectory(prefix="build-debian-", dir=data_dir) as tmp:
            image = Path(tmp) / f"{name}.img"
            try:
                build_debian_image(
                    image, suite=suite, size=size, extra_packages=packages.split(","),
                    mirror=mirror, cache_dir=cache_dir, say=say,
                )  # fmt: skip
            except DebianBuildError as exc:
                raise ClientError(str(exc), "invalid") from exc
            import_image(image, data_dir, name, None, mode, write_cache, persistence, as_json)


@app.command()
def commit(
    name: str,
    data_dir: DataDirOption,
    stage: Annotated[str | None, typer.Option(help="maintenance (default)|test|production")] = None,
    as_json: JsonOption = False,
) -> None:
    """Make the writes of the vdisk's last (finished) maintenance session its next version."""
    from shared.settings import Settings

    with cli_errors(as_json):
        client = RegistryClient.from_data_dir(data_dir)
        root = Path(client.get("/registry/status")["vdisk_root"])
        source = client.get(f"/vdisks/{name}/commit-source")
        kernel = client.get(f"/vdisks/{name}").get("kernel")
        settings = Settings(data_dir=data_dir)
        with progress_bar(as_json) as progress:
            staged = asyncio.run(_stage_commit(settings, root, source, progress, kernel))
        result = register(
            client, root, staged, stage=stage, from_maintenance_session=source["session_id"]
        )
    print_result(result, as_json, show_vdisk)


async def _stage_commit(
    settings: Settings,
    root: Path,
    source: dict[str, Any],
    progress: vdisk_store.Progress,
    kernel: str | None,
) -> vdisk_store.StagedVersion:
    from shared import bus
    from shared.settings import without_password
    from shared.vdisk_commit import stage_commit

    nats_url = settings.require_nats_url()
    try:
        # bus.connect reconnects forever once nats-py retries; bound it here.
        connecting = bus.connect(
            nats_url,
            "streamboot-cli",
            credentials=settings.nats_credentials("cli"),
            connect_timeout_s=5,
        )
        nc = await asyncio.wait_for(connecting, 10)
    except (bus.BusError, TimeoutError) as exc:
        raise ClientError(
            f"cannot reach NATS at {without_password(nats_url)} ({exc or 'timeout'})",
            "unreachable",
            EXIT_UNREACHABLE,
        ) from None
    try:
        return await stage_commit(nc, root, source, progress, kernel)
    except (OSError, bus.BusError, TimeoutError) as exc:
        # The cache service holds the session's writes: name it when it is the problem.
        raise ClientError(f"reading the write cache from the cache service failed: {exc}") from None
    finally:
        await nc.close()


@app.command("list")
def list_(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """List vdisks."""
    run(data_dir, as_json, lambda c: c.get("/vdisks"), show_vdisks)


@app.command()
def show(name: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Show a vdisk."""
    run(data_dir, as_json, lambda c: c.get(f"/vdisks/{name}"), show_vdisk)


@app.command()
def versions(name: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """List a vdisk's versions and their stages."""
    run(data_dir, as_json, lambda c: c.get(f"/vdisks/{name}/versions"), show_versions)


@app.command()
def promote(
    name: str,
    version: int,
    data_dir: DataDirOption,
    to: Annotated[str, typer.Option("--to", help="test|production")],
    as_json: JsonOption = False,
) -> None:
    """Promote a version to test or production (running clients move at their next boot)."""
    body = {"version": version, "to": to}
    run(data_dir, as_json, lambda c: c.post(f"/vdisks/{name}/promote", body), show_vdisk)


@app.command()
def merge(
    name: str,
    data_dir: DataDirOption,
    upto: Annotated[
        int | None,
        typer.Option(help="the version whose chain becomes one base (default: production)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Merge a version's chain of layers into one base layer (the same content, block for
    block); versions before it retire, running sessions keep reading their old layers."""
    with cli_errors(as_json):
        # The registry writes the whole image: as long as that takes.
        client = RegistryClient.from_data_dir(data_dir, timeout_s=24 * 3600)
        result = client.post(f"/vdisks/{name}/merge", {"upto": upto})
    print_result(result, as_json, show_vdisk)


@app.command()
def rollback(name: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Go back to the previous production version."""
    run(data_dir, as_json, lambda c: c.post(f"/vdisks/{name}/rollback"), show_vdisk)


@app.command("set")
def set_(
    name: str,
    data_dir: DataDirOption,
    mode: Annotated[str | None, typer.Option(help="standard|private")] = None,
    write_cache: Annotated[
        str | None, typer.Option(help="server-ram|server-disk|client-ram|client-disk")
    ] = None,
    persistence: Annotated[str | None, typer.Option(help="discard|keep")] = None,
    store: Annotated[str | None, typer.Option(help=STORE_HELP)] = None,
    boot_method: Annotated[
        str | None,
        typer.Option(
            "--boot-method",
            "--boot",
            help="auto (kernel-direct when a kernel was found, else sanboot)|kernel|sanboot|"
            "sanboot-iscsi (iPXE's iSCSI initiator; the OS finds the disk by the iBFT)|"
            "nbdroot (kernel-direct without the streamboot client: Debian's nbdroot=)|"
            "iscsi-ibft (kernel-direct, the root over iSCSI through the iBFT: open-iscsi)",
        ),
    ] = None,
    kernel: Annotated[
        str | None,
        typer.Option(
            help="kernel version (as in vmlinuz-VERSION) that versions published from now on "
            "boot, instead of the newest; '' for the newest"
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Change the image mode, the write-cache policy, the store it is read from or how it
    boots."""
    body = {
        "mode": mode,
        "write_cache": write_cache,
        "write_cache_persistence": persistence,
        "store": store,
        "boot_method": boot_method,
        "kernel": kernel,
    }
    run(data_dir, as_json, lambda c: c.patch(f"/vdisks/{name}", body), show_vdisk)


@app.command()
def remove(name: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Remove a vdisk and its files (refused while a live session uses it)."""
    run(
        data_dir,
        as_json,
        lambda c: c.delete(f"/vdisks/{name}"),
        lambda r: out.print(f"removed vdisk {r['removed']}"),
    )
