"""A log line's reason is never empty: an exception without a message is named by its type."""

from __future__ import annotations

from shared.errors import reason


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    assert reason(TimeoutError()) == "TimeoutError"
    assert reason(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"
