"""sse_lines: one ``data:`` event per chunk, ``[DONE]`` last, errors as an ``error`` event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai.types.chat as sdk

from openft.errors import InvalidRequest
from openft.inference.stream import DONE, sse_lines
from openft.protocol.chat import ChatCompletionChunk, ChunkChoice, ChunkDelta


def _chunk(text: str | None = None, finish: str | None = None) -> ChatCompletionChunk:
    delta = (
        ChunkDelta(role="assistant", content="")
        if text is None and finish is None
        else ChunkDelta(content=text)
    )
    return ChatCompletionChunk(
        id="chatcmpl-x",
        created=1,
        model="m",
        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
    )


def _events(raw: list[bytes]) -> list[str]:
    out = []
    for event in raw:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert b"\n" not in event[:-2]
        out.append(event[len(b"data: ") : -2].decode())
    return out


def test_events_then_done() -> None:
    raw = list(sse_lines([_chunk(), _chunk("Hé\nllo"), _chunk(finish="stop")]))
    assert raw[-1] == DONE == b"data: [DONE]\n\n"
    payloads = _events(raw[:-1])
    chunks = [sdk.ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads]
    assert chunks[1].choices[0].delta.content == "Hé\nllo"
    assert chunks[2].choices[0].finish_reason == "stop"


def test_error_mid_stream_becomes_an_error_event_without_done() -> None:
    closed = []

    def chunks() -> Iterator[ChatCompletionChunk]:
        try:
            yield _chunk()
            raise InvalidRequest("image too big", param="messages[0].content[1]", code="image_too_large")
        finally:
            closed.append(True)

    raw = list(sse_lines(chunks()))
    assert DONE not in raw
    error = json.loads(_events(raw)[-1])["error"]
    assert error == {
        "message": "image too big",
        "type": "invalid_request_error",
        "param": "messages[0].content[1]",
        "code": "image_too_large",
    }
    assert closed == [True]


def test_unexpected_error_is_a_server_error_event() -> None:
    def chunks() -> Iterator[ChatCompletionChunk]:
        yield _chunk()
        raise RuntimeError("boom")

    raw = list(sse_lines(chunks()))
    error = json.loads(_events(raw)[-1])["error"]
    assert error["type"] == "server_error" and "boom" not in error["message"]


def test_closing_the_sse_iterator_closes_the_chunks() -> None:
    closed = []

    def chunks() -> Iterator[ChatCompletionChunk]:
        try:
            while True:
                yield _chunk("x")
        finally:
            closed.append(True)

    lines = sse_lines(chunks())
    next(lines)
    lines.close()
    assert closed == [True]
