"""``tool_choice: "auto"`` with a strict tool, and arguments streamed in pieces, through the openai
SDK against ``openft serve`` with an untrained ChatML (Qwen2.5-layout) text model.

In that model ``<tool_call>`` is one added token, as in Qwen's tokenizers, so a random model
writes it now and then (a small ``logit_bias`` makes that often enough to count): whatever it
writes after it, a call to a strict tool must come out with arguments that follow the schema,
and text without a call must stay free text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from transformers import AutoTokenizer

from openft.models.tiny_text import ensure_tiny_text
from tests.conftest import Server, model_cache, start_server

MODEL = "tiny-chatml"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}}]
ASK = [{"role": "user", "content": "What is the weather in Paris for three days?"}]
SAMPLES = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    source = ensure_tiny_text("chatml", model_cache() / "text")
    catalog = {MODEL: {"source": str(source)}}
    srv = start_server(
        tmp_path_factory.mktemp("auto") / "home",
        "--no-worker",
        env={"OPENFT_BASE_MODELS": json.dumps(catalog)},
    )
    srv.marker_id = AutoTokenizer.from_pretrained(source).convert_tokens_to_ids("<tool_call>")  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    return server.client("auto-tools")


def _request(server: Server, seed: int, **kw: Any) -> dict[str, Any]:
    return dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=1,
        seed=seed,
        max_completion_tokens=400,
        parallel_tool_calls=False,
        logit_bias={str(server.marker_id): 4},  # type: ignore[attr-defined]
        **kw,
    )


@pytest.mark.slow  # samples 24 replies of up to 400 tokens, each token masked
def test_auto_calls_to_a_strict_tool_always_follow_its_schema(server: Server, client) -> None:
    called = texts = 0
    for seed in range(SAMPLES):
        choice = client.chat.completions.create(**_request(server, seed, tool_choice="auto")).choices[0]
        if choice.message.tool_calls:
            called += 1
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        else:
            texts += 1
            assert choice.finish_reason in ("stop", "length")
            assert "<tool_call>" not in (choice.message.content or "")  # never a broken call
    # Both branches were taken: the grammar let the model choose, and constrained only the calls.
    assert called >= 3 and texts >= 3, (called, texts)


@pytest.mark.slow  # samples a reply of up to 400 constrained tokens twice
def test_arguments_stream_in_several_pieces_that_add_up(server: Server, client) -> None:
    args = _request(server, 0, tool_choice="required")
    whole = client.chat.completions.create(**args).choices[0]
    (call,) = whole.message.tool_calls
    first = None
    pieces: list[str] = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                assert d.index == 0
                if first is None:  # index, id, type and name first, with empty arguments
                    first = d
                    assert d.id.startswith("call_") and d.type == "function" and d.function.arguments == ""
                else:
                    assert d.id is None and d.function.name is None
                    pieces.append(d.function.arguments)
    assert first is not None and first.function.name == call.function.name
    assert len(pieces) >= 5, pieces  # token by token, not one piece at the end
    assert "".join(pieces) == call.function.arguments
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
