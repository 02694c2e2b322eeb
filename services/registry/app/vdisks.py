"""Vdisks: versions published, promoted, rolled back and merged, and the layer files of
the local store they keep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.registry import merge as merge_store
from services.registry.app.core import CommandCore, log
from services.registry.domain import vdisks
from services.registry.domain.errors import DomainError, invalid
from services.registry.projection import Projection, Record
from shared import vdisk_store
from shared.contracts.cache.wire import kept_write_cache_key
from shared.events import Event, VdiskLayersRemoved
from shared.layer_paths import LayerPathError, check_relative_layer

# How long a version's layer paths, once checked on disk, are handed out unchecked.
LAYER_CHECK_TTL_S = 5.0


class VdiskCommands(CommandCore):
    # --- vdisks -----------------------------------------------------------------------

    def list_vdisks(self) -> list[Record]:
        return [self.vdisk_view(n) for n in sorted(self.projection.vdisks)]

    def vdisk_view(self, name: str) -> Record:
        vd = vdisks.get_vdisk(self.projection, name)
        latest = vdisks.latest_version(vd)
        return {
            "name": vd["name"],
            "size": vd["size"],
            "mode": vd["mode"],
            "write_cache": vd["write_cache"],
            "write_cache_persistence": vd["write_cache_persistence"],
            "store": vd["store"],
            "latest_version": latest,
            "production_version": vdisks.production_version(vd),
            "live_sessions": len(self.projection.live_sessions_of_vdisk(name)),
            "last_maintenance": vd["last_maintenance"],
            "boot_method": vd.get("boot_method", "auto"),
            "kernel": vd.get("kernel"),
            # What each version holds to boot kernel-direct (BootFilesScanned).
            "boot": {
                str(n): v.get("boot") for n, v in sorted(vd["versions"].items()) if v.get("boot")
            },
            # The latest version's chain, for an importer computing the next delta.
            "latest_layers": vdisk_store.layer_paths(
                self.vdisk_root, name, vdisks.chain(vd, latest)
            ),
            **self._chain_view(vd),
        }

    def _chain_view(self, vd: Record) -> Record:
        """How long its chains are and what its layers take on disk (local store)."""
        latest, prod = vdisks.latest_version(vd), vdisks.production_version(vd)
        kept = sorted({x for v in vd["versions"].values() if not v["retired"] for x in v["layers"]})
        view: Record = {
            "chain_length": len(vd["versions"][latest]["layers"]) if latest else 0,
            "production_chain_length": len(vd["versions"][prod]["layers"]) if prod else 0,
            "retired_versions": sorted(n for n, v in vd["versions"].items() if v["retired"]),
            "superseded_layers": list(vd["superseded"]),
            "layers_bytes": None,
            "superseded_bytes": None,
        }
        if vd["store"] == vdisks.LOCAL_STORE:
            files = merge_store.layer_files
            view["layers_bytes"] = merge_store.allocated_bytes(
                files(self.vdisk_root, vd["name"], kept)
            )
            view["superseded_bytes"] = merge_store.allocated_bytes(
                files(self.vdisk_root, vd["name"], vd["superseded"])
            )
        return view

    def commit_source(self, name: str) -> Record:
        """The finished maintenance session whose kept writes would become the next
        version, with where its write cache lives (the cache service's key)."""
        last = vdisks.check_commit(self.projection, name)
        vd = self.projection.vdisks[name]
        return {
            **last,
            "vdisk": name,
            "next_version": last["version"] + 1,
            "size": vd["versions"][last["version"]]["size"],
            "layers": vdisk_store.layer_paths(
                self.vdisk_root, name, vdisks.chain(vd, last["version"])
            ),
            "write_cache_key": kept_write_cache_key(last["mac"], name, last["version"]),
        }

    def versions(self, name: str) -> list[Record]:
        vd = vdisks.get_vdisk(self.projection, name)
        prod = vdisks.production_version(vd)
        return [
            {**v, "current_production": v["version"] == prod}
            for _, v in sorted(vd["versions"].items())
        ]

    async def publish_version(
        self,
        name: str,
        *,
        version: int,
        staging: str,
        layer: str,
        size: int,
        checksum: str,
        changed_blocks: int,
        block_size: int,
        stage: str | None = None,
        mode: str = "standard",
        write_cache: str = "server-disk",
        write_cache_persistence: str = "discard",
        store: str | None = None,
        from_maintenance_session: str | None = None,
        boot: Record | None = None,
    ) -> Record:
        """Register a version staged by ``vdisk_store.stage_version`` (or built from a
        maintenance session's writes): move its files into place and append the events, or
        drop the staging dir and raise. ``boot``: what the importer found to boot
        kernel-direct (``shared/boot_files.py``); the staged kernel and initramfs
        are measured here."""
        root = self.vdisk_root
        found = None
        if boot is not None:
            found = {k: v for k, v in boot.items() if v is not None}
            if boot.get("kernel_version"):
                try:
                    found.update(
                        await asyncio.to_thread(vdisk_store.staged_boot_files, root, name, staging)
                    )
                except DomainError:
                    vdisk_store.discard_staged(root, name, staging)
                    raise

        def decide(p: Projection) -> list[Event]:
            if from_maintenance_session is not None:
                last = vdisks.check_commit(p, name)
                if last["session_id"] != from_maintenance_session:
                    raise DomainError(
                        f"vdisk {name!r}: the last maintenance session is {last['session_id']}, "
                        f"not {from_maintenance_session}",
                        "conflict",
                    )
            return vdisks.publish(
                p,
                name,
                version=version,
                stage=stage,
                path=layer,
                size=size,
                checksum=checksum,
                changed_blocks=changed_blocks,
                block_size=block_size,
                mode=mode,
                write_cache=write_cache,
                write_cache_persistence=write_cache_persistence,
                store=store,
                stores=self.stores,
                boot=found,
            )

        def effect() -> Callable[[], None]:
            moved = []
            if found and found.get("kernel_version"):
                moved = vdisk_store.commit_boot_files(root, name, staging, version)
            try:
                moved += vdisk_store.commit_staged(root, name, staging, layer)
            except BaseException:
                for path in moved:
                    path.unlink(missing_ok=True)
                raise

            def undo() -> None:
                for path in moved:
                    path.unlink(missing_ok=True)

            return undo

        try:
            await self._execute(decide, effect=effect)
        finally:
            vdisk_store.discard_staged(root, name, staging)
        return {
            **self.vdisk_view(name),
            "version": self.projection.vdisks[name]["versions"][version],
        }

    async def merge_vdisk(self, name: str, upto: int | None = None) -> Record:
        """Write the chain of version ``upto`` (default: production) as one base layer and
        publish it (``VdiskChainMerged``); then remove what nothing reads any more."""
        root = self.vdisk_root
        version = vdisks.merge_target(self.projection, name, upto)  # bad input: said now
        with merge_store.merge_lock(root, name):
            await self.catch_up()
            version = vdisks.merge_target(self.projection, name, version)
            vd = self.projection.vdisks[name]
            layers = self._served_layers(vd, version)
            base = merge_store.base_name(name, version)
            log.info("registry: merging %s up to version %d (%d layers)", name, version,
                     len(layers))  # fmt: skip
            staging, checksum = await asyncio.to_thread(
                merge_store.stage_base, root, name, layers, version
            )

            def effect() -> Callable[[], None]:
                moved = vdisk_store.commit_staged(root, name, staging, base)
                merge_store.fsync_dir(root / name)

                def undo() -> None:
                    for path in moved:
                        path.unlink(missing_ok=True)

                return undo

            try:
                await self._execute(
                    lambda p: vdisks.merge(p, name, version, base, checksum), effect=effect
                )
            finally:
                vdisk_store.discard_staged(root, name, staging)
        await self.sweep_layers()
        return {**self.vdisk_view(name), "merged_upto": version, "base": base}

    async def auto_merge(self) -> list[str]:
        """Merge every local vdisk whose production chain has more layers than
        ``vdisk_auto_merge_layers`` (0: never)."""
        limit = self.settings.vdisk_auto_merge_layers
        merged: list[str] = []
        if limit <= 0:
            return merged
        for name, vd in sorted(self.projection.vdisks.items()):
            prod = vdisks.production_version(vd)
            if vd["store"] != vdisks.LOCAL_STORE or prod is None:
                continue
            if len(vd["versions"][prod]["layers"]) > limit and (name, prod) not in self._unmerged:
                try:
                    await self.merge_vdisk(name, prod)
                    merged.append(name)
                except DomainError as exc:
                    # Not tried again for this version (a checksum that differs would
                    # rewrite the whole image every round); `vdisk merge` still can.
                    self._unmerged.add((name, prod))
                    log.warning("registry: automatic merge of %s not done: %s", name, exc)
        return merged

    async def sweep_layers(self) -> list[str]:
        """Delete the superseded layer files of merged chains once no session live at the
        merge still lives and no cache node keeps a write cache of a retired version."""
        removed: list[str] = []
        for name, vd in sorted(self.projection.vdisks.items()):
            if not vd["superseded"] or self._still_read(vd):
                continue
            retired = {n for n, v in vd["versions"].items() if v["retired"]}
            if retired and await self._kept_caches_of(name, retired):
                continue
            removed += await self._remove_superseded(name, list(vd["superseded"]))
        return removed

    async def _remove_superseded(self, name: str, gone: list[str]) -> list[str]:
        root = self.vdisk_root
        freed = merge_store.allocated_bytes(merge_store.layer_files(root, name, gone))

        def decide(p: Projection) -> list[Event]:
            now = p.vdisks.get(name)
            # Decided again on the caught-up state: a session or merge may have come.
            if now is None or now["superseded"] != gone or self._still_read(now):
                return []
            return [VdiskLayersRemoved(name=name, layers=gone, bytes_freed=freed)]

        def effect() -> Callable[[], None]:
            merge_store.remove_layers(root, name, gone)
            return lambda: None  # a removal whose event failed is done again

        if not await self._execute(decide, effect=effect):
            return []
        log.info("registry: removed %d merged layer(s) of %s (%d bytes)", len(gone), name, freed)
        return gone

    def _still_read(self, vd: Record) -> bool:
        return any(sid in self.projection.sessions for sid in vd["superseded_readers"])

    async def _kept_caches_of(self, name: str, versions: set[int]) -> bool:
        """Whether a cache node keeps a write cache of one of these versions (or a cache
        node did not answer: then it may)."""
        if self._write_caches is None:
            return False
        try:
            beats = await self._heartbeats() if self._heartbeats is not None else []
            if not any(b.get("service") == "cache" and b.get("alive") for b in beats):
                return False  # no cache node: no write cache is kept anywhere
            caches, complete = await self._write_caches()
        except Exception as exc:
            log.info("registry: write caches unknown (%s); merged layers kept", exc)
            return True
        return not complete or any(
            c.get("vdisk") == name and c.get("version") in versions for c in caches
        )

    async def promote(self, name: str, version: int, to: str) -> Record:
        requires_test = self.settings.vdisk_promotion_requires_test
        await self._execute(
            lambda p: vdisks.promote(p, name, version, to, requires_test=requires_test)
        )
        return self.vdisk_view(name)

    async def rollback(self, name: str) -> Record:
        await self._execute(lambda p: vdisks.rollback(p, name))
        return self.vdisk_view(name)

    async def set_policy(self, name: str, **policy: str | None) -> Record:
        await self._execute(lambda p: vdisks.set_policy(p, name, **policy, stores=self.stores))
        return self.vdisk_view(name)

    async def remove_vdisk(self, name: str) -> Record:
        await self._execute(lambda p: vdisks.remove(p, name))
        # After the removal is committed: a crash here leaves files, never a dangling event.
        await asyncio.to_thread(vdisk_store.remove_files, self.vdisk_root, name)
        return {"removed": name}

    def _served_layers(self, vd: Record, version: int) -> list[str]:
        """A version's layers as stream and cache nodes find them: paths in this registry's
        vdisk dir for the local store, else relative to the store's root (a share holding
        the same ``<vdisk>/<layer>`` tree)."""
        chain = vdisks.chain(vd, version)
        if vd["store"] == vdisks.LOCAL_STORE:
            # Checked on disk (symbolic links followed) once per LAYER_CHECK_TTL_S, not per
            # session of a storm: the nodes check every layer again before they open it.
            key = (vd["name"], tuple(chain))
            now = time.monotonic()
            checked = self._layers_checked.get(key)
            if checked is not None and now - checked[0] < LAYER_CHECK_TTL_S:
                return list(checked[1])
            paths = vdisk_store.layer_paths(self.vdisk_root, vd["name"], chain)
            if len(self._layers_checked) >= 1024:
                self._layers_checked.clear()
            self._layers_checked[key] = (now, paths)
            return list(paths)
        try:
            return [check_relative_layer(rel, vd["name"]) for rel in chain]
        except LayerPathError as exc:
            raise invalid(str(exc)) from None
