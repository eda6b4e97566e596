"""One place that turns errors into OpenAI's error JSON.

Domain errors (``openft.errors``) and request validation map to 4xx with ``param``; anything
else is our bug: logged with its traceback and answered as a 500 ``server_error``.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from openft.errors import OpenFTError
from openft.protocol.errors import ErrorBody, ErrorResponse

log = logging.getLogger("openft.api")

# pydantic adds union-member tags such as "literal['auto']" or "constrained-int" to locations.
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAGS = {"int", "float", "str", "bool", "function-after", "function-before", "function-wrap"}
# PydanticCustomError types raised by our protocol models: passed on as the error's stable ``code``.
_OWN_CODES = {"invalid_hyperparameter", "unsupported_method"}


def error_response(
    status: int,
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    headers = dict(headers or {})
    if status < 500 and status not in (408, 409, 429):
        # Deterministic refusal: the same request will fail the same way, so the SDK must not retry.
        headers["x-should-retry"] = "false"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def loc_to_param(loc: tuple[object, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header", "form"):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _FIELD.match(item) and item not in _TAGS:
            parts.append(("." if parts else "") + item)
        else:
            break
    return "".join(parts) or None


def _is_lock_timeout(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "database is locked" in text or "lock timeout" in text


def install(app: FastAPI) -> None:
    @app.exception_handler(OpenFTError)
    async def _domain(_: Request, exc: OpenFTError) -> JSONResponse:
        # 429/503 are "busy, come back": the SDK retries them after Retry-After.
        retry = {"retry-after": "1"} if exc.status_code in (429, 503) else None
        return error_response(
            exc.status_code, exc.message, type=exc.error_type, param=exc.param, code=exc.code, headers=retry
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "Invalid request"}
        param = loc_to_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "Invalid request")
        extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        if first.get("type") in _OWN_CODES:  # our own message already names the field and the limit
            return error_response(
                400, msg + extra, type="invalid_request_error", param=param, code=first["type"]
            )
        message = f"Invalid value for '{param}': {msg}{extra}" if param else f"{msg}{extra}"
        return error_response(400, message, type="invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        param = getattr(exc, "param", None)  # set by api.limits.BodyTooLarge
        return error_response(
            exc.status_code, str(exc.detail), type="invalid_request_error", param=param, code=code
        )

    @app.exception_handler(SQLAlchemyTimeoutError)
    @app.exception_handler(OperationalError)
    async def _busy(request: Request, exc: Exception) -> JSONResponse:
        # Pool exhausted or SQLite's lock wait ran out: the server is busy, not broken. The
        # SDK retries a 503 after Retry-After. Anything else from the database is a bug (500).
        if isinstance(exc, OperationalError) and not _is_lock_timeout(exc):
            return await _bug(request, exc)
        log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "The server is busy; retry shortly.",
            type="server_error",
            code="overloaded",
            headers={"retry-after": "1"},
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "The server had an error while processing your request.",
            type="server_error",
            code="server_error",
        )
