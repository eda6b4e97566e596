"""What the API admits: request bodies within a size limit, and a bounded number of requests.

Both are plain ASGI middleware so they act before FastAPI reads a byte of the body:

- :class:`BodyLimit` refuses a body over its limit with 413 — at once when ``Content-Length``
  declares it, and otherwise (chunked uploads) as soon as the bytes actually received pass it,
  so nothing past the limit is ever buffered or written.
- :class:`Admission` answers 503 with ``Retry-After`` once ``max_inflight`` requests are in the
  server (running or waiting for a thread), instead of queueing without bound until clients
  time out. The openai SDK retries 503 by itself, honouring ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openft.api.errors import error_response

# Multipart framing around an uploaded file: an upload request may exceed the file limit by this much.
MULTIPART_SLACK = 64 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body. An ``HTTPException``, because FastAPI passes those
    through its body parsing (anything else there becomes a 400 "error parsing the body")."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(413, detail=message)
        self.param = param


class BodyLimit:
    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], tuple[int, str, str | None]]) -> None:
        """``limit_for(path)`` gives the byte limit for a path, the setting that raises it and
        the ``param`` to blame."""
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit, setting, param = self.limit_for(scope["path"])
        message = f"Request body exceeds the {limit}-byte limit of this endpoint; send less, or raise {setting}."
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(
                413, message, type="invalid_request_error", param=param, code="request_too_large"
            )
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read: the API's error handler answers 413.
                    raise BodyTooLarge(message, param=param)
            return msg

        await self.app(scope, limited_receive, send)


class Admission:
    def __init__(self, app: ASGIApp, *, max_inflight: int, prefix: str = "/v1/") -> None:
        self.app, self.max_inflight, self.prefix = app, max_inflight, prefix
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            response = error_response(
                503,
                f"The server is at its limit of {self.max_inflight} concurrent requests; retry shortly.",
                type="server_error",
                code="overloaded",
                headers={"retry-after": "1"},
            )
            return await response(scope, receive, send)
        self.inflight += 1  # single event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
