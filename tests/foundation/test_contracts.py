"""The contracts in shared/contracts: the architecture page's table lists every subject
they declare, the kept write-cache key is one string for every spelling of a MAC, and the
session record survives the trip the registry's resolve answer and an announcement take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.contracts import registry, stream
from shared.contracts.cache import wire
from shared.contracts.registry import SessionRecord

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def table_subjects() -> set[str]:
    """The first cell of each row of the page's subject table."""
    text = DOC.read_text()
    start = text.index("| subject | request | reply | owner")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return {row.split("|")[1].strip().strip("`") for row in rows}


@pytest.mark.parametrize("module", [registry, stream, wire], ids=lambda m: m.__name__)
def test_the_architecture_table_lists_every_subject(module: object) -> None:
    missing = set(module.SUBJECTS) - table_subjects()  # type: ignore[attr-defined]
    assert not missing, f"docs/architecture.md lacks {sorted(missing)}"


def test_a_kept_write_cache_has_one_key_for_every_spelling_of_its_mac() -> None:
    keys = {
        wire.kept_write_cache_key(mac, "win", 3)
        for mac in ("52:54:00:AB:CD:EF", "52:54:00:ab:cd:ef", "525400abcdef")
    }
    # The form stream nodes have always made (and the registry, for its lower-case MACs).
    assert keys == {"device-525400abcdef-win-v3"}


def test_a_session_record_survives_the_announcement() -> None:
    record = SessionRecord(
        session_id="s-1", vdisk="win", version=2, size=1 << 20, layers=["/v/win/v1.raw"],
        mac="52:54:00:ab:cd:ef", write_cache="server-disk", write_cache_persistence="keep",
    )  # fmt: skip
    body = json.dumps({**record.model_dump(), "token": "t" * 40}).encode()
    assert stream.parse_announcement(body) == ("t" * 40, record)


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"token": "x"}', b'{"token": 5, "session_id": "s"}', b"not json"],
)
def test_a_malformed_announcement_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        stream.parse_announcement(body)
