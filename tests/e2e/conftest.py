"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import traversable_tmpdir


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir for one `streamboot up` (not created: `up` creates it)."""
    path = traversable_tmpdir("streamboot-e2e-")
    yield path / "dd"
    shutil.rmtree(path, ignore_errors=True)
