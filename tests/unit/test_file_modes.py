"""Files that name clients, sessions and vdisks are this user's only, whatever the umask:
write-cache descriptions, read-cache and boot-profile state, the trace file; vdisk images
are readable by the store's group (the data plane), never by everyone."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.cache.write_cache import WriteCaches
from shared import vdisk_store
from shared.contracts.cache.bodies import WcOpen
from shared.private_file import replace_private
from shared.telemetry import JsonLinesSpanExporter
from tests.registry.conftest import write_image

MiB = 1 << 20


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 0644 unless made otherwise
    yield
    os.umask(old)


def test_write_cache_files_and_description(tmp_path: Path) -> None:
    wcs = WriteCaches(tmp_path / "disk", tmp_path / "ram", capacity=1 << 30,
                      on_full=lambda wc: None, on_first_change=lambda wc: None)  # fmt: skip
    wcs.recover()
    wc = wcs.open(WcOpen(key="s1", session_id="s1", vdisk="d", version=1,
                         size=8 * MiB, kind="server-disk", persistence="keep"))  # fmt: skip
    wcs.prepare("s1")
    paths = wc.paths()
    assert any(p.suffix == ".json" for p in paths)
    assert {p.name: mode(p) for p in paths} == {p.name: 0o600 for p in paths}
    wc.close()


def test_state_files_replaced_privately(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    (tmp_path / "state.json.tmp").write_text("left by a crash")
    os.chmod(tmp_path / "state.json.tmp", 0o644)
    replace_private(target, '{"a": 1}', durable=True)
    assert target.read_text() == '{"a": 1}' and mode(target) == 0o600
    assert not (tmp_path / "state.json.tmp").exists()


def test_trace_file(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text("")  # from a run before this one: 0644
    for path in (tmp_path / "traces.jsonl", old):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
        with provider.get_tracer("t").start_as_current_span("boot"):
            pass
        provider.shutdown()
        assert '"name": "boot"' in path.read_text() and mode(path) == 0o600


def test_vdisk_files_raw_qcow2_and_delta(tmp_path: Path) -> None:
    root = tmp_path / "store"
    raw = write_image(tmp_path / "1.raw", 4 * MiB, {0: b"one"})
    qcow2 = tmp_path / "1.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    for name, source in (("r", raw), ("q", qcow2)):
        s1 = vdisk_store.stage_version(root, name, source, 1, [])
        assert mode(root / name / s1.staging) == 0o700  # nobody else in while staging
        vdisk_store.commit_staged(root, name, s1.staging, s1.layer)
    v2 = write_image(tmp_path / "2.raw", 4 * MiB, {0: b"two"})
    s2 = vdisk_store.stage_version(root, "r", v2, 2, [root / "r" / "v1.raw"])
    vdisk_store.commit_staged(root, "r", s2.staging, s2.layer)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["q/v1.raw", "r/v1.raw", "r/v2.data", "r/v2.map"]
    assert {f: mode(root / f) for f in files} == {f: 0o640 for f in files}
    assert mode(root / "r") == 0o750 and mode(root / "q") == 0o750
