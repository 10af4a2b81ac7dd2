"""Errors as HTTP responses: the one table of error code -> HTTP status, and the body
every error has, ``{"error": {"code", "message", "details"}}`` (the codes of
``dspex_tasks.errors``, the same a Python caller matches on).

Request-shape errors (a missing field, a wrong JSON type, malformed JSON) keep the
Python codes too: ``invalid_inputs``, never FastAPI's default 422 body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dspex_tasks.errors import (
    DspexError,
    InvalidInputs,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
)

__all__ = [
    "STATUS_BY_CODE",
    "ErrorBody",
    "error_response",
    "error_responses",
    "install_error_handlers",
    "send_error",
    "status_for",
]

log = logging.getLogger("dspex_tasks.gateway")

#: Every error code and the HTTP status it answers with (README: "Error codes and HTTP
#: statuses"). A code missing here is a 500, so a new code must be added.
STATUS_BY_CODE: Mapping[str, int] = {
    # 401: who is asking is not known
    "unauthorized": 401,
    # 404: what the request names does not exist (or no longer does)
    "not_found": 404,
    "session_not_found": 404,
    "session_expired": 404,
    "variable_not_found": 404,
    "program_not_found": 404,
    "dataset_not_found": 404,
    "run_not_found": 404,
    "history_unavailable": 404,
    # 405
    "method_not_allowed": 405,
    # 409: the request conflicts with the current state
    "session_exists": 409,
    "variable_exists": 409,
    "version_conflict": 409,
    "session_busy": 409,
    "optimization_in_progress": 409,
    "run_cancelled": 409,
    "duplicate_delivery": 409,
    # 413
    "payload_too_large": 413,
    # 422: the request is well-formed JSON but its content is invalid
    "invalid_session_id": 422,
    "invalid_inputs": 422,
    "validation_failed": 422,
    "unknown_type": 422,
    "invalid_program": 422,
    "tool_not_found": 422,
    "unknown_lm_profile": 422,
    # 429: a quota or rate limit
    "session_quota_exceeded": 429,
    "lm_rate_limited": 429,
    "budget_exceeded": 429,
    # 5xx: the service or what it depends on failed
    "invalid_settings": 500,
    "internal_error": 500,
    "dspex_error": 500,
    "lm_error": 502,
    "store_unavailable": 503,
    "task_timeout": 504,
}


def status_for(code: str) -> int:
    """The HTTP status of an error code (500 for a code the table does not know)."""
    return STATUS_BY_CODE.get(code, 500)


class ErrorDetail(BaseModel):
    """The error itself: ``code`` is stable (match on it), ``message`` is for people."""

    code: str = Field(description="Stable error code: " + ", ".join(sorted(STATUS_BY_CODE)))
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


def _body(code: str, message: str, details: Mapping[str, Any] | None) -> bytes:
    return orjson.dumps(
        {"error": {"code": code, "message": message, "details": dict(details or {})}},
        default=str,
    )


def error_response(error: DspexError, headers: Mapping[str, str] | None = None) -> Response:
    """The JSON response for ``error``, with its status from the table."""
    return Response(
        _body(error.code, error.message, error.details),
        status_code=status_for(error.code),
        media_type="application/json",
        headers=dict(headers or {}),
    )


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    error: DspexError,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer with ``error`` from plain ASGI middleware (auth, body limit)."""
    await error_response(error, headers)(scope, receive, send)


def _validation_details(exc: RequestValidationError) -> dict[str, Any]:
    problems = []
    for item in exc.errors():
        problems.append(
            {
                "loc": [str(part) for part in item.get("loc", ())],
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "")),
            }
        )
    return {"problems": problems}


def _validation_message(details: dict[str, Any]) -> str:
    first = details["problems"][0] if details["problems"] else None
    if first is None:
        return "invalid request"
    where = ".".join(first["loc"]) or "request"
    more = len(details["problems"]) - 1
    return f"{where}: {first['msg']}" + (f" (and {more} more)" if more else "")


def install_error_handlers(app: FastAPI) -> None:
    """Turn every error a route can raise into the one error body."""

    async def on_dspex_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DspexError)
        return error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = _validation_details(exc)
        return error_response(InvalidInputs(_validation_message(details), details))

    async def on_http(request: Request, exc: Exception) -> Response:
        # Starlette's own: an unknown path or method, or a body over its limit.
        assert isinstance(exc, StarletteHTTPException)
        error: DspexError
        if exc.status_code == 404:
            error = RouteNotFound(f"no route {request.url.path!r}", {"path": request.url.path})
        elif exc.status_code == 405:
            error = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path!r}",
                {"method": request.method},
            )
        elif exc.status_code == 413:
            error = PayloadTooLarge("request body too large")
        else:  # e.g. a body that is not JSON at all: keep Starlette's status
            return Response(
                _body("invalid_inputs", str(exc.detail), {}),
                status_code=exc.status_code,
                media_type="application/json",
            )
        return error_response(error, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The trace goes to the log; the caller learns nothing about the internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Response(
            _body("internal_error", "internal error", {}),
            status_code=500,
            media_type="application/json",
        )

    app.add_exception_handler(DspexError, on_dspex_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


#: Errors any /v1 route can answer with, whatever it does.
_COMMON_CODES = ("unauthorized", "store_unavailable", "internal_error")


def error_responses(
    *codes: str, body: bool = False, public: bool = False
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: one entry per status, naming its codes.

    ``body``: the route reads a JSON body (so ``payload_too_large`` and
    ``invalid_inputs`` for a malformed one apply). ``public``: no token needed.
    """
    common = [c for c in _COMMON_CODES if not (public and c == "unauthorized")]
    wanted: list[str] = [*codes, *common]
    if body:
        wanted += ["payload_too_large", "invalid_inputs"]
    by_status: dict[int, list[str]] = {}
    for code in _unique(wanted):
        by_status.setdefault(status_for(code), []).append(code)
    return {
        status: {
            "model": ErrorBody,
            "description": "error codes: " + ", ".join(f"`{c}`" for c in found),
        }
        for status, found in sorted(by_status.items())
    }


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
