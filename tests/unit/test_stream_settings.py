"""The stream node's settings come from the STREAMBOOT_* environment (shared/settings.py)."""

from __future__ import annotations

import pytest

from services.stream.settings import StreamSettings
from shared.settings import Settings


def test_the_copy_to_sendfile_threshold_is_set_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STREAMBOOT_STREAM_NBD_ZERO_COPY_MIN_CONNECTIONS", raising=False)
    assert StreamSettings.from_settings(Settings()).nbd_zero_copy_min_connections == 1
    monkeypatch.setenv("STREAMBOOT_STREAM_NBD_ZERO_COPY_MIN_CONNECTIONS", "8")
    monkeypatch.setenv("STREAMBOOT_STREAM_SESSION_LINGER_S", "5")
    s = StreamSettings.from_settings(Settings())
    assert s.nbd_zero_copy_min_connections == 8 and s.session_linger_s == 5.0


def test_the_busy_poll_window_is_set_in_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMBOOT_STREAM_BUSY_POLL_US", raising=False)
    assert StreamSettings.from_settings(Settings()).busy_poll_s == pytest.approx(200e-6)
    monkeypatch.setenv("STREAMBOOT_STREAM_BUSY_POLL_US", "0")  # off
    assert StreamSettings.from_settings(Settings()).busy_poll_s == 0
    monkeypatch.setenv("STREAMBOOT_STREAM_BUSY_POLL_US", "50")
    assert StreamSettings.from_settings(Settings()).busy_poll_s == pytest.approx(50e-6)
