"""Back-pressure on session opens (issue 28, Bad input): a burst beyond what the registry
takes is answered "busy, retry" — NATS ``kind: busy`` with ``retry_after_s``, REST 503 with
``Retry-After`` (asked with curl) — never an internal error, and never a half-open session:
a refused open appends nothing, every session that exists was answered to its caller.

The burst is made deterministic by holding the registry's command lock while it arrives
(as a long group commit would): the first few opens queue, the rest are refused at once;
held past the wait limit, the queued ones are refused too, when their turn comes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from shared import bus
from tests.conftest import wait_for
from tests.registry.conftest import TOKEN, Registry, nc  # noqa: F401
from tests.registry.test_sessions import seed

pytestmark = pytest.mark.timeout(180)
MACS = [f"52:54:00:bb:00:{i:02x}" for i in range(24)]
WAITING = 4


def opened_macs(reg: Registry) -> list[str]:
    return sorted(s["mac"] for s in reg.app.projection.sessions.values())


async def open_over_nats(nc: Any, mac: str) -> dict[str, Any] | bus.RemoteError:  # noqa: F811
    try:
        return await bus.request_json(
            nc, "streamboot.registry.session.open", {"mac": mac}, timeout_s=30
        )
    except bus.RemoteError as exc:
        return exc


async def curl_open(api_url: str, mac: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST /sessions with curl: (status, headers in lower case, JSON body)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-i", "-X", "POST", f"{api_url}/sessions",
        "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
        "--data", json.dumps({"mac": mac}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, json.loads(body)


async def test_a_burst_over_nats_gets_busy_and_no_half_open_session(
    registry: Registry,
    nc: Any,  # noqa: F811
) -> None:
    await seed(registry, registry.data_dir, *MACS)
    registry.app.settings.registry_max_waiting_opens = WAITING
    async with registry.app._lock:  # a commit under way: the burst has to wait
        burst = [asyncio.create_task(open_over_nats(nc, m)) for m in MACS]
        await wait_for(lambda: registry.app.opens_refused_busy >= len(MACS) - WAITING, "refusals")
    answers = dict(zip(MACS, await asyncio.gather(*burst), strict=True))
    refused = {m for m, a in answers.items() if isinstance(a, bus.RemoteError)}
    assert {a.kind for m, a in answers.items() if m in refused} == {"busy"}, answers
    for m in refused:
        wait = answers[m].detail["retry_after_s"]  # type: ignore[union-attr]
        assert 1 <= wait <= registry.app.settings.registry_busy_retry_max_s
        assert "busy" in str(answers[m]) and "retry" in str(answers[m])
    assert len(refused) == len(MACS) - WAITING
    # Every session in the log was answered; a refused open left nothing behind.
    assert opened_macs(registry) == sorted(set(MACS) - refused)
    # Asked again (as the boot service's script does), each opens.
    for m in sorted(refused):
        again = await open_over_nats(nc, m)
        assert isinstance(again, dict) and again["token"], again
    assert opened_macs(registry) == sorted(MACS)


async def test_an_open_that_waited_too_long_is_refused_not_decided(
    registry: Registry,
    nc: Any,  # noqa: F811
) -> None:
    await seed(registry, registry.data_dir, *MACS[:3])
    registry.app.settings.registry_open_max_wait_s = 0.2
    async with registry.app._lock:
        burst = [asyncio.create_task(open_over_nats(nc, m)) for m in MACS[:3]]
        await wait_for(lambda: registry.app._opens_in_flight >= 3, "the opens to queue")
        await asyncio.sleep(0.4)  # past their deadline while still queued
    answers = await asyncio.gather(*burst)
    assert all(isinstance(a, bus.RemoteError) and a.kind == "busy" for a in answers), answers
    assert "waited too long" in str(answers[0])
    assert opened_macs(registry) == []


async def test_a_burst_over_rest_gets_503_retry_after_never_500(registry: Registry) -> None:
    macs = MACS[:12]
    await seed(registry, registry.data_dir, *macs)
    registry.app.settings.registry_max_waiting_opens = WAITING
    async with registry.app._lock:
        burst = [asyncio.create_task(curl_open(registry.api_url, m)) for m in macs]
        await wait_for(lambda: registry.app.opens_refused_busy >= len(macs) - WAITING, "refusals")
    answers = dict(zip(macs, await asyncio.gather(*burst), strict=True))
    statuses = sorted(status for status, _, _ in answers.values())
    assert statuses == [201] * WAITING + [503] * (len(macs) - WAITING), statuses
    busy = {m for m, (status, _, _) in answers.items() if status == 503}
    for m in busy:
        _, headers, body = answers[m]
        assert body["kind"] == "busy" and "retry" in body["error"], body
        assert 1 <= int(headers["retry-after"]) <= registry.app.settings.registry_busy_retry_max_s
    assert opened_macs(registry) == sorted(set(macs) - busy)
    for m in sorted(busy):
        status, _, body = await curl_open(registry.api_url, m)
        assert status == 201 and body["token"], body
    assert opened_macs(registry) == sorted(macs)
