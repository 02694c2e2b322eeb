"""Events read from the bus go through the catalog's models: an envelope of a known type
becomes its typed event, anything else is a clear ``BadEvent`` that a consumer logs and
skips."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from shared.events import (
    BadEvent,
    ClientBooted,
    SessionClosed,
    envelope,
    parse_event,
    parse_message,
    received,
    subject_of,
)


@dataclass
class Msg:
    subject: str
    data: bytes


def wire(event: SessionClosed | ClientBooted, traceparent: str | None = None) -> bytes:
    return envelope(event, traceparent=traceparent).model_dump_json().encode()


def test_an_envelope_becomes_its_typed_event() -> None:
    closed = SessionClosed(session_id="s-1", reason="shutdown", bytes_read=5)
    assert parse_event(wire(closed)) == closed
    env, event = parse_message(wire(closed, "00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
    assert event == closed and env.traceparent and env.type == "SessionClosed"


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"type": "SessionClosed"}',
        b'{"type": "NoSuchEvent", "stream_id": "x", "data": {}}',
        b'{"type": "SessionClosed", "stream_id": "session-s", "data": {"session_id": 5}}',
        b'{"type": "SessionClosed", "stream_id": "session-s", "data": {"reason": "x"}}',
        b"\xff\xfe",
    ],
)
def test_bad_bytes_are_a_bad_event(data: bytes) -> None:
    with pytest.raises(BadEvent):
        parse_event(data)


def test_received_logs_bad_bytes_and_skips_other_types(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="streamboot.events")
    subject = subject_of(SessionClosed)
    assert received(Msg(subject, b"{junk"), SessionClosed) is None
    assert "skipped a message on events.SessionClosed.>" in caplog.text
    booted = ClientBooted(session_id="s-1", mac="aa:bb:cc:dd:ee:ff")
    assert received(Msg(subject, wire(booted)), SessionClosed) is None
    assert received(Msg(subject, wire(booted)), ClientBooted) == booted
