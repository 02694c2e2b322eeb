"""The request bodies' bounded field types and the error answers' clipping: every route
module uses them, so an error never quotes a big input."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import Field

from services.registry.domain.errors import DomainError

# An error message quotes what it refuses; past this it is cut (the input is the caller's).
MAX_ERROR_CHARS = 500
MAX_LISTED_ERRORS = 5

# Identifiers (MACs, names, ids) and file names: bounded, so no error quotes a big input.
Name = Annotated[str, Field(max_length=64)]
Text = Annotated[str, Field(max_length=255)]
# Kernel command lines and the importer's notes.
LongText = Annotated[str, Field(max_length=4096)]


# A domain error's kind as the HTTP status it answers.
STATUS = {"invalid": 400, "refused": 403, "not_found": 404, "conflict": 409, "busy": 503}


def domain_error_response(exc: DomainError) -> JSONResponse:
    """A refused command's answer: its status, ``{"error", "kind"}`` and ``Retry-After``
    when it says when to ask again."""
    retry = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(
        {"error": clip(str(exc)), "kind": exc.kind}, status_code=STATUS[exc.kind], headers=retry
    )


def clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def validation_message(errors: Any) -> str:
    """What is wrong with a request, by field: pydantic's messages without the input."""
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ()))[:100]}: {str(e.get('msg', 'invalid'))[:200]}"
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    more = len(errors) - MAX_LISTED_ERRORS
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
