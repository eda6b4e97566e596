"""A built-in tiny text model named in the catalog, through ``openft serve`` and the openai SDK:
listed by ``/v1/models``, chat answers, and a Qwen3-format model takes ``reasoning_effort``
(``none`` switches thinking off; ``low`` is a 400 naming the values that work)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Server, start_server
from tests.openapi_schema import has_spec, validate_against

pytestmark = pytest.mark.slow  # its own server, and the model is built on first use

MODEL = "openft-tiny-qwen3"
ASK = [{"role": "user", "content": "Colour of the sky?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("builtin-text") / "home",
        "--no-worker",
        env={"OPENFT_BASE_MODELS": json.dumps([MODEL])},
    )
    yield s
    s.stop()


def test_listed_and_served(server: Server) -> None:
    c = server.client("builtin-text")
    assert MODEL in [m.id for m in c.models.list()]
    assert c.models.retrieve(MODEL).id == MODEL
    body = {"model": MODEL, "messages": ASK, "max_completion_tokens": 6, "reasoning_effort": "none"}
    r = httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {c.api_key}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    if has_spec():
        validate_against("CreateChatCompletionResponse", r.json())
    message = r.json()["choices"][0]["message"]
    assert "<think>" not in (message["content"] or "") and "</think>" not in (message["content"] or "")
    stream = c.chat.completions.create(
        model=MODEL, messages=ASK, max_completion_tokens=6, reasoning_effort="minimal", stream=True
    )
    assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] in ("stop", "length")


def test_reasoning_effort_the_model_cannot_honour_is_a_400(server: Server) -> None:
    c = server.client("builtin-text")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=4, reasoning_effort="low")
    assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_value"
    assert "'none'" in e.value.message and "'medium'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # a value outside the spec's enum
        c.chat.completions.create(
            model=MODEL, messages=ASK, max_completion_tokens=4, extra_body={"reasoning_effort": "extreme"}
        )
    assert e.value.param == "reasoning_effort"
    # The built-in VLM has no reasoning control: only "none" is honoured.
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="openft-tiny-vlm", messages=ASK, max_completion_tokens=4, reasoning_effort="high"
        )
    assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_parameter"
