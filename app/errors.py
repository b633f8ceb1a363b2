"""Domain errors and their RFC 9457 problem+json form."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"


class APIError(Exception):
    """An answer other than success: an HTTP status, a stable `code`, and a human `detail`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        return problem_document(
            self.status, self.code, self.detail, errors=self.errors, **self.extra
        )


def problem_document(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": f"/problems/{code.lower().replace('_', '-')}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        document["errors"] = errors
    document.update(extra)
    return document


def problem_body(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, default=str)


def validation_error(
    errors: list[dict[str, str]], detail: str = "The request is invalid."
) -> APIError:
    return APIError(400, "VALIDATION_ERROR", detail, errors=errors)


def database_unavailable() -> APIError:
    return APIError(
        503,
        "DATABASE_UNAVAILABLE",
        "The database is not reachable right now; retry with the same idempotency key.",
        headers={"Retry-After": "1"},
    )
