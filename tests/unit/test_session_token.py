"""Session tokens are command-line arguments: never one that reads as an option."""

from __future__ import annotations

import pytest

from services.registry.app import tokens as app


def test_a_token_with_a_leading_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["-looks-like-an-option", "-again", "fine-token_A"])
    monkeypatch.setattr(app.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert app.new_session_token() == "fine-token_A"


def test_tokens_are_256_bit_url_safe_and_never_start_with_a_dash() -> None:
    tokens = {app.new_session_token() for _ in range(3000)}
    assert len(tokens) == 3000
    assert all(len(t) == 43 and not t.startswith("-") for t in tokens)
    assert any("-" in t for t in tokens)  # the alphabet itself is unchanged
