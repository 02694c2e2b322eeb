"""Run one fuzz target under atheris (libFuzzer): ``make fuzz`` runs each in turn.

    uv run python -m tests.fuzz.run TARGET [libFuzzer flags, e.g. -runs=1000000]

The seed corpus is ``tests/fuzz/corpus/TARGET`` (read only: new inputs go to a scratch
folder); a crash or a slow input (``-timeout``, 1 s by default) is written to
``tests/fuzz/findings/TARGET/`` and ends the run with a non-zero status.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).parent

# The modules whose code atheris instruments for coverage, per target.
INSTRUMENTED: dict[str, tuple[str, ...]] = {
    "nbd": ("services.stream.nbd.server", "services.stream.conn"),
    "nbd_options": ("services.stream.nbd.protocol",),
    "iscsi": (
        "services.stream.iscsi.server",
        "services.stream.iscsi.pdu",
        "services.stream.iscsi.scsi",
        "services.stream.iscsi.chap",
    ),
    "http_head": ("shared.http_head",),
    "tftp": ("services.boot.tftp_packets",),
    "dhcp": ("services.boot.dhcp_packets",),
    "event": ("shared.envelope", "shared.event_owners", "shared.events"),
    "vdisk_layout": ("shared.vdisk_layout",),
    "partitions": ("shared.partitions",),
}


def main() -> None:
    name, flags = sys.argv[1], sys.argv[2:]
    # Instrumented as they are first imported: before the targets module imports them.
    with atheris.instrument_imports(include=list(INSTRUMENTED[name])):
        from tests.fuzz import targets
    target = targets.TARGETS[name]
    if name in targets.PREPARE:
        targets.PREPARE[name]()
    findings = HERE / "findings" / name
    findings.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    argv = [
        sys.argv[0],
        "-timeout=1",
        "-rss_limit_mb=2048",
        "-max_len=8192",
        f"-artifact_prefix={findings}/",
        *flags,
        scratch,
        str(HERE / "corpus" / name),
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
