"""Issue 12: request bounds checked before any work, and generation that stops when cancelled."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from openft.errors import InvalidRequest
from openft.inference import engine
from openft.inference.chat import MAX_CHARS_PER_TOKEN, chars_per_token, check_request_size, create_completion
from openft.inference.registry import LoadedModel
from openft.protocol.chat import ChatCompletionRequest

HI = [{"role": "user", "content": "Hello"}]
NO_EOS = {"0": -100, "2": -100}  # the tiny model's end-of-turn tokens: choices run to max_tokens


def req(messages: list[dict[str, Any]] | None = None, **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "openft-tiny-vlm", "messages": messages or HI, **kw}
    )


def test_n_times_max_tokens_above_the_cap_names_n(loaded: LoadedModel) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request_size(loaded, req(n=8, max_tokens=100), max_completion_tokens_per_request=799)
    assert err.value.param == "n" and "800" in err.value.message and "799" in err.value.message
    check_request_size(loaded, req(n=8, max_tokens=100), max_completion_tokens_per_request=800)


def test_one_choice_over_the_cap_names_the_token_parameter(loaded: LoadedModel) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request_size(loaded, req(max_completion_tokens=50), max_completion_tokens_per_request=49)
    assert err.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest) as err:  # no cap given: the server default counts
        check_request_size(loaded, req(n=128), max_completion_tokens_per_request=1000)
    assert err.value.param == "n" and "default 256" in err.value.message


def test_a_prompt_that_cannot_fit_is_refused_by_its_length(loaded: LoadedModel) -> None:
    per_token = chars_per_token(loaded)
    assert 1 <= per_token <= MAX_CHARS_PER_TOKEN
    limit = loaded.context_length * per_token
    check_request_size(
        loaded, req([{"role": "user", "content": "x" * limit}]), max_completion_tokens_per_request=10**6
    )
    parts = [{"type": "text", "text": "x" * (limit // 2)}, {"type": "text", "text": "x" * (limit // 2 + 1)}]
    with pytest.raises(InvalidRequest) as err:
        check_request_size(
            loaded, req([{"role": "user", "content": parts}]), max_completion_tokens_per_request=10**6
        )
    assert err.value.param == "messages" and f"{limit + 1:,} characters" in err.value.message
    # The bound is sound: a prompt of `limit` characters really has at least context_length/… tokens,
    # i.e. no token of the model covers more characters than assumed.
    longest = max(len(loaded.tokenizer.decode([i])) for i in range(len(loaded.tokenizer)))
    assert longest <= loaded.longest_token_chars


def test_cancel_stops_generation_and_frees_the_model(loaded: LoadedModel) -> None:
    cancel = threading.Event()
    params = engine.SamplingParams(max_new_tokens=400, logit_bias=((0, -100.0), (2, -100.0)))
    prompt = engine.Prompt(input_ids=loaded.tokenizer("Hello")["input_ids"])
    seen = 0
    with pytest.raises(engine.GenerationCancelled) as err:
        for event in engine.generate(loaded, prompt, params, n=8, cancel=cancel):
            seen += isinstance(event, engine.TextDelta)
            if seen == 3:
                cancel.set()  # as the API does when the client disconnects
    assert loaded.batcher.active_rows() == 0  # every choice left the batch when it stopped
    assert err.value.budget == 8 * 400 and 3 <= err.value.tokens < 400  # stopped a few steps in


def test_cancelled_before_the_model_is_free_never_starts(loaded: LoadedModel, image_loader) -> None:
    cancel = threading.Event()
    with loaded.batcher.lock:  # the model is busy with a forward pass
        result: list[BaseException] = []

        def run() -> None:
            try:
                create_completion(
                    loaded, req(max_tokens=50, logit_bias=NO_EOS), image_loader=image_loader, cancel=cancel
                )
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        cancel.set()  # the client left while waiting for the model
    t.join()
    assert len(result) == 1 and isinstance(result[0], engine.GenerationCancelled)
    assert result[0].tokens == 0
