"""Every admin API route's role, as the gate decides it: a new route (or a moved one) must
be placed here on purpose, so no change becomes an operator's or a viewer's by accident."""

from __future__ import annotations

import re
from pathlib import Path

from services.registry.app import RegistryApp
from services.registry.gate import audit_path, required_role
from services.registry.rest import build_api
from shared.settings import Settings

EXPECTED = {
    "GET /devices": "viewer",
    "POST /devices": "operator",
    "GET /devices/{mac}": "viewer",
    "PATCH /devices/{mac}": "operator",
    "POST /devices/{mac}/disable": "operator",
    "POST /devices/{mac}/enable": "operator",
    "POST /devices/{mac}/maintenance": "admin",
    "POST /devices/{mac}/wake": "operator",
    # CHAP credentials are secrets: only an admin sets or clears them.
    "PUT /devices/{mac}/chap": "admin",
    "DELETE /devices/{mac}/chap": "admin",
    "POST /devices/import": "operator",
    "GET /collections": "viewer",
    "POST /collections": "operator",
    "DELETE /collections/{name}": "operator",
    "POST /collections/{name}/rename": "operator",
    "GET /collections/{name}/chap": "viewer",
    "PUT /collections/{name}/chap": "admin",
    "DELETE /collections/{name}/chap": "admin",
    "DELETE /devices/{mac}": "operator",
    "GET /assignments": "viewer",
    "POST /assignments": "operator",
    "DELETE /assignments/{target_kind}/{target}/{vdisk}": "operator",
    "GET /vdisks": "viewer",
    "GET /vdisks/{name}": "viewer",
    "GET /vdisks/{name}/versions": "viewer",
    "POST /vdisks/{name}/versions": "admin",
    "GET /vdisks/{name}/commit-source": "viewer",
    "POST /vdisks/{name}/promote": "admin",
    "POST /vdisks/{name}/merge": "admin",
    "POST /vdisks/{name}/commit": "admin",
    # Import and commit progress: anyone sees it, an admin (who imports) reports it.
    "GET /jobs": "viewer",
    "GET /jobs/{job_id}": "viewer",
    "POST /jobs": "admin",
    "PUT /jobs/{job_id}": "admin",
    "POST /jobs/{job_id}/end": "admin",
    "POST /vdisks/{name}/rollback": "admin",
    "PATCH /vdisks/{name}": "admin",
    "DELETE /vdisks/{name}": "admin",
    "GET /sessions": "viewer",
    "POST /sessions": "operator",
    "POST /sessions/replay": "operator",
    "DELETE /sessions/{token_or_id}": "operator",
    "GET /events": "viewer",
    "POST /registry/rebuild": "admin",
    "GET /registry/status": "viewer",
    "GET /tokens": "admin",
    "POST /tokens": "admin",
    "DELETE /tokens/{name}": "admin",
    "GET /health": None,
}


def test_every_route_has_the_role_it_is_meant_to(tmp_path: Path) -> None:
    api = build_api(RegistryApp(None, Settings(data_dir=tmp_path)), "t", 1024)  # type: ignore[arg-type]
    found = {}
    for path, operations in api.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in operations:
            found[f"{method.upper()} {path}"] = required_role(method.upper(), concrete)
    assert found == EXPECTED
    assert required_role("GET", "/openapi.json") is None
    assert required_role("POST", "/devicesx") == "admin"  # a prefix is a whole path segment


def test_the_audit_path_never_holds_a_session_token() -> None:
    assert audit_path("/sessions/abcDEF-ghi_123") == "/sessions/<token>"
    sid = "01890a5d-ac96-774b-bcce-b302099a8057"
    assert audit_path(f"/sessions/{sid}") == f"/sessions/{sid}"
    assert audit_path("/sessions/replay") == "/sessions/replay"
    assert audit_path("/devices/52:54:00:00:00:01") == "/devices/52:54:00:00:00:01"
    assert len(audit_path("/devices/" + "x" * 10_000)) == 512
