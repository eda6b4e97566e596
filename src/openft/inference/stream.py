"""Server-sent events for streamed chat completions: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from openft.errors import OpenFTError
from openft.inference.engine import GenerationCancelled
from openft.protocol.chat import ChatCompletionChunk
from openft.protocol.errors import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_event(chunk: ChatCompletionChunk) -> bytes:
    """One chunk as one SSE event (compact JSON on one line: the SDK reads one ``data:`` per event)."""
    return b"data: " + chunk.model_dump_json().encode("utf-8") + b"\n\n"


def sse_lines(chunks: Iterable[ChatCompletionChunk]) -> Iterator[bytes]:
    """Encode ``chunks`` as SSE events and end with ``[DONE]``.

    Once the first bytes are sent the HTTP status is fixed at 200, so a failure mid-stream is sent
    as an event with an ``error`` key (the openai SDK raises ``APIError`` on it) and the stream
    ends without ``[DONE]``. Closing this iterator closes ``chunks`` (which cancels generation).
    """
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            yield sse_event(chunk)
    except GenerationCancelled:  # the client went away: nobody is left to tell
        return
    except OpenFTError as exc:
        yield error_event(exc.message, exc.error_type, exc.param, exc.code)
        return
    except Exception:
        log.exception("chat completion stream failed")
        yield error_event("the server failed while generating; please retry", "server_error", None, None)
        return
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    yield DONE


def error_event(message: str, error_type: str, param: str | None, code: str | None) -> bytes:
    body = ErrorResponse(error=ErrorBody(message=message, type=error_type, param=param, code=code))
    return b"data: " + body.model_dump_json().encode("utf-8") + b"\n\n"
