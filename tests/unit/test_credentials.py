"""Where a process's credentials come from, and that URLs are shown without passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import Settings, nats_password_file, url_with_password, without_password


def test_nats_credentials_from_settings_else_the_roles_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STREAMBOOT_NATS_USER", "STREAMBOOT_NATS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert Settings(data_dir=tmp_path).nats_credentials("cli") is None  # anonymous
    secret = nats_password_file(tmp_path, "cli")
    secret.parent.mkdir()
    secret.write_text("from-the-data-dir\n")
    assert Settings(data_dir=tmp_path).nats_credentials("cli") == ("cli", "from-the-data-dir")
    assert Settings(data_dir=tmp_path).nats_credentials("stream") is None
    # Credentials in the URL: nats-py uses those.
    in_url = Settings(data_dir=tmp_path, nats_url="nats://ops:pw@h:4222")
    assert in_url.nats_credentials("cli") is None
    monkeypatch.setenv("STREAMBOOT_NATS_USER", "ops")
    monkeypatch.setenv("STREAMBOOT_NATS_PASSWORD", "given")
    assert Settings(data_dir=tmp_path).nats_credentials("cli") == ("ops", "given")


def test_urls_are_shown_without_their_password() -> None:
    dsn = "postgresql://streamboot:s3cret@127.0.0.1:5432/streamboot"
    assert without_password(dsn) == "postgresql://streamboot@127.0.0.1:5432/streamboot"
    assert without_password("nats://a:pw1@h1:4222, nats://b:pw2@h2:4222") == (
        "nats://a@h1:4222,nats://b@h2:4222"
    )
    assert without_password("nats://h:4222") == "nats://h:4222"
    bare = "postgresql://streamboot@127.0.0.1:5432/db"
    assert (
        url_with_password(bare, "p/w@:x")
        == "postgresql://streamboot:p%2Fw%40%3Ax@127.0.0.1:5432/db"
    )


def test_the_cli_adds_the_embedded_databases_password(tmp_path: Path) -> None:
    (tmp_path / "runtime.json").write_text('{"database_url": "postgresql://streamboot@h:1/db"}')
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "postgres").write_text("pw\n")
    settings = Settings(data_dir=tmp_path, database_url=None)
    assert settings.require_database_url() == "postgresql://streamboot:pw@h:1/db"
