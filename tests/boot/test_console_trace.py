"""A boot's trace waterfall in the console, in a real browser (Debian's chromium): a
kernel-direct boot's requests served by the real boot service (the script, then the kernel
and initramfs fetched by curl as iPXE fetches them) and the registry's session open, their
spans written by the project's own jsonl exporter, drawn on the device's boot timeline:
the same spans `streamboot trace show` prints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from shared.telemetry import JsonLinesSpanExporter
from tests.boot.test_service import MAC, UUID, Boot, boot, curl
from tests.registry.conftest import Registry, write_bootable_image
from tests.registry.test_console_browser import CHROMIUM, browser, log_in, page, shot

__all__ = ["boot", "browser", "page"]  # fixtures
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium"),
]


class _WhileOn(JsonLinesSpanExporter):
    """The exporter, for this test only: the provider is the process's, shared by the
    tests that run after this one."""

    on = True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return super().export(spans) if self.on else SpanExportResult.SUCCESS


@pytest.fixture
def span_file(registry: Registry) -> Iterator[Path]:
    """Where the registry reads spans (DATA_DIR/traces.jsonl), written as the jsonl
    exporter of `streamboot up` writes it."""
    path = registry.settings.data_path("traces.jsonl")
    exporter = _WhileOn(path)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield path
    exporter.on = False


async def test_a_boots_trace_waterfall_in_the_console(
    boot: Boot, registry: Registry, span_file: Path, page: Any, tmp_path: Path
) -> None:
    image = write_bootable_image(registry.data_dir / "linux.raw")
    await registry.cli_json("vdisk", "import", str(image), "--name", "linux")
    await registry.cli_json("device", "add", MAC, "--hostname", "traced-001")
    await registry.cli_json("assign", MAC, "linux", "--default")
    script = await boot.script(mac=MAC, uuid=UUID)
    [kernel] = [x.split()[1] for x in script.splitlines() if x.startswith("kernel ")]
    [initrd] = [x.split()[3] for x in script.splitlines() if x.startswith("initrd ")]
    assert (await curl(kernel, "-o", "/dev/null", initrd, "-o", "/dev/null")).returncode == 0
    [session] = registry.app.list_sessions()
    # The CLI's view of the same trace.
    code, out, err = await registry.cli(
        "trace", "show", session["session_id"], "--json",
        env={"STREAMBOOT_DATABASE_URL": registry.settings.require_database_url()},
    )  # fmt: skip
    assert code == 0, err
    names = {s["name"] for s in json.loads(out)}
    assert {"ipxe script", "kernel download", "initrd download"} <= names, names

    await log_in(page, registry)
    await page.goto(f"{registry.api_url}/console/boots/{MAC}")
    waterfall = page.locator("table.waterfall").first
    await waterfall.wait_for()
    for name in names:
        await waterfall.locator(f"tr[data-span='{name}']").wait_for()
    kernel_row = waterfall.locator("tr[data-span='kernel download']")
    assert "bytes=" in (await kernel_row.get_attribute("title") or "")
    assert await kernel_row.locator("svg rect.dl").count() == 1
    await shot(page, tmp_path, "waterfall")
    assert page.errors == [], page.errors
