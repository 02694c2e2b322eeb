"""Every fuzz target over its seed corpus and a few hundred variations of it, in the normal
suite: what ``make fuzz`` found once stays found (each finding's input is in the corpus)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS, _NbdServer

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(autouse=True, scope="module")
def nbd_server_stopped() -> Iterator[None]:
    yield
    _NbdServer.stop()


def seeds(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_takes_its_corpus(name: str) -> None:
    found = seeds(name)
    assert found, f"no seed corpus for {name}"
    for data in found:
        TARGETS[name](data)


def mutated(name: str) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes overwritten, cut short, or extended with noise."""

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds(name))))
        for _ in range(draw(st.integers(0, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
        return bytes(data + draw(st.binary(max_size=64)))

    return one()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_takes_variations_of_its_corpus(name: str) -> None:
    @settings(
        max_examples=200, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(mutated(name))
    def run(data: bytes) -> None:
        TARGETS[name](data)

    run()
