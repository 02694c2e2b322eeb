"""The vdisk page's policy form offers every value the registry takes: a vdisk booting by a
method the form did not list showed (and would have saved) the first one instead."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.registry.conftest import TOKEN, Registry
from tests.registry.test_collection_delete import a_vdisk

pytestmark = pytest.mark.timeout(60)


async def test_the_policy_form_shows_the_vdisks_own_boot_method(registry: Registry) -> None:
    await a_vdisk(registry, "win")
    async with registry.http() as http:
        changed = await http.patch("/vdisks/win", json={"boot_method": "sanboot-iscsi"})
        assert changed.status_code == 200, changed.text
    async with httpx.AsyncClient(base_url=registry.api_url) as browser:
        await browser.post("/login", data={"token": TOKEN})
        page = (await browser.get("/console/vdisks/win")).text
    form = page[page.index('<select name="boot_method">') :]
    form = form[: form.index("</select>")]
    assert re.findall(r"<option selected>([^<]+)</option>", form) == ["sanboot-iscsi"], form
    assert "iscsi-ibft" in form and "nbdroot" in form
