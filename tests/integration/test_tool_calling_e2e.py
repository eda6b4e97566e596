"""A tiny model fine-tuned on tool-calling data answers held-out phrasings with parsed
``tool_calls`` through the openai SDK, and streaming gives the same calls as non-streaming.

The task: a keyword hidden among filler words picks the tool (the weather for a city, the lamp
for a colour) and is its argument; held-out prompts use filler arrangements never seen in training. The
calls are decoded freely (``tool_choice: "auto"``): the model must have learned the Hermes format
its template rendered in training, which serving then parses.
"""

from __future__ import annotations

import io
import json
import random

import pytest

from tests.integration.test_service_e2e import wait_for
from tests.tasks import FILLER

pytestmark = pytest.mark.slow

CITIES = ("Paris", "Tokyo", "Lima", "Oslo")
COLOURS = ("red", "green", "blue", "white")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": list(CITIES)}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_lamp",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": list(COLOURS)}},
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


def test_fine_tuned_tool_calls_are_parsed_and_stream_equal(full_server) -> None:
    c = full_server.client("tool-calling")
    train = [_case(random.Random(1), i) for i in range(160)]
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
        model="openft-tiny-vlm",
        seed=5,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 6, "batch_size": 8, "learning_rate_multiplier": 1.0}
            },
        },
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error

    right = 0
    for prompt, name, args in held_out:
        request = dict(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": prompt}],
            tools=TOOLS,
            temperature=0,
            max_completion_tokens=48,
        )
        out = c.chat.completions.create(**request).choices[0]
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in out.message.tool_calls or ()]
        right += calls == [(name, args)] and out.finish_reason == "tool_calls"
        streamed: dict[int, list[str]] = {}
        finish = None
        for chunk in c.chat.completions.create(**request, stream=True):
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or ():
                    entry = streamed.setdefault(d.index, [d.function.name or "", ""])
                    entry[1] += d.function.arguments or ""
        assert finish == out.finish_reason
        assert [(n, json.loads(a)) for n, a in streamed.values()] == calls
    assert right >= 6, f"{right}/8 held-out prompts answered with the right call"
