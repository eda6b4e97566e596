"""A tiny model fine-tuned on tool-calling data answers held-out phrasings with parsed
``tool_calls`` through the openai SDK, and streaming gives the same calls as non-streaming.

The task: a keyword hidden among filler words picks the tool (the weather for a city, the lamp
for a colour) and is its argument, so the arguments are derivable from the prompt alone;
held-out prompts use filler arrangements never seen in training. Calls are asked for as the
issue's user did (``tool_choice: "required"``): the grammar fixes the format, the fine-tuned
model chooses the function and writes the arguments.

The model is the tiny ChatML (Qwen2.5 layout) text model: the tool definitions are in its
prompt as Qwen's template puts them, and ``<tool_call>`` is one added token, as in Qwen's
tokenizers, which the grammar lets the model write as it was trained to.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator

import pytest

from openft.models.tiny_text import ensure_tiny_text
from tests.conftest import Server, catalog_server, model_cache
from tests.integration.test_service_e2e import wait_for
from tests.tasks import FILLER

pytestmark = pytest.mark.slow

MODEL = "tiny-chatml"
SEED = int(os.environ.get("OPENFT_TOOL_E2E_SEED", "5"))  # to measure the spread over seeds

CITIES = ("Paris", "Tokyo", "Lima", "Oslo")
COLOURS = ("red", "green", "blue", "white")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_lamp",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string"}},
            },
        },
    },
]


def _case(rng: random.Random, i: int) -> tuple[str, str, dict[str, str]]:
    words = rng.sample(FILLER, 3)
    if i % 2 == 0:  # a city asks for the weather there, a colour sets the lamp to it
        city = CITIES[(i // 2) % len(CITIES)]
        words.insert(rng.randrange(4), city)
        return "Please " + " ".join(words) + "?", "get_weather", {"city": city}
    colour = COLOURS[(i // 2) % len(COLOURS)]
    words.insert(rng.randrange(4), colour)
    return "Please " + " ".join(words) + "?", "set_lamp", {"colour": colour}


def _jsonl(cases: list[tuple[str, str, dict[str, str]]]) -> bytes:
    lines = []
    for k, (prompt, name, args) in enumerate(cases):
        call = {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "tool_calls": [call]}]
        lines.append(json.dumps({"messages": messages, "tools": TOOLS, "parallel_tool_calls": False}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with catalog_server(tmp_path_factory, {MODEL: ensure_tiny_text("chatml", model_cache() / "text")}) as srv:
        yield srv


def test_fine_tuned_tool_calls_are_parsed_and_stream_equal(server: Server) -> None:
    c = server.client("tool-calling")
    rng = random.Random(1)
    train = [_case(rng, i) for i in range(240)]
    seen = {p for p, _, _ in train}
    rng = random.Random(99)
    held_out = []
    while len(held_out) < 8:
        case = _case(rng, len(held_out))
        if case[0] not in seen:
            held_out.append(case)
    f = c.files.create(file=("tools.jsonl", io.BytesIO(_jsonl(train))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=MODEL,
        seed=SEED,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 32, "batch_size": 8}}},
    )
    job = wait_for(c, job.id, timeout=3600)
    assert job.status == "succeeded", job.error

    def request(model: str, prompt: str) -> dict:
        return dict(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_completion_tokens=48,
        )

    # The base model, under the same grammar, writes calls too, but not the right ones.
    base = 0
    for prompt, name, args in held_out:
        out = c.chat.completions.create(**request(MODEL, prompt)).choices[0]
        calls = out.message.tool_calls or []
        base += out.finish_reason == "tool_calls" and [
            (t.function.name, json.loads(t.function.arguments)) for t in calls
        ] == [(name, args)]
    assert base <= 2, base

    right_names = right_calls = 0
    for prompt, name, args in held_out:
        out = c.chat.completions.create(**request(job.fine_tuned_model, prompt)).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        raw = [(t.function.name, t.function.arguments) for t in out.message.tool_calls]
        calls = [(n, json.loads(a)) for n, a in raw]
        assert len(calls) == 1 and set(calls[0][1]) == {"city" if calls[0][0] == "get_weather" else "colour"}
        right_names += calls[0][0] == name
        right_calls += calls == [(name, args)]
        streamed: dict[int, list[str]] = {}
        finish = None
        for chunk in c.chat.completions.create(**request(job.fine_tuned_model, prompt), stream=True):
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or ():
                    entry = streamed.setdefault(d.index, [d.function.name or "", ""])
                    entry[1] += d.function.arguments or ""
        assert finish == out.finish_reason
        assert [tuple(v) for v in streamed.values()] == raw  # the same name and argument bytes
    print(f"seed {SEED}: base {base}/8, fine-tuned {right_calls}/8 whole calls, {right_names}/8 functions")
    # The bar: the right function with the right arguments on >= 6 of 8 held-out prompts.
    assert right_calls >= 6, f"{right_calls}/8 whole calls right ({right_names}/8 right functions)"
