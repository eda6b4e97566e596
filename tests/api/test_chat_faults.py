"""Issue 12 through the openai SDK against a real ``openft serve``: abandoned chats free the model,
request limits answer 400 naming the parameter, deep JSON nesting is a 400 (not a 500), and
SIGTERM ends the server promptly even with an ``n=128`` request generating."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, start_server

MODEL = "openft-tiny-vlm"
HI = [{"role": "user", "content": "Say something long."}]
# The tiny model's end-of-turn tokens (<|endoftext|> = 0, <|im_end|> = 2) pushed out of reach, so
# every choice runs to max_tokens: a request that would take minutes to finish.
NO_EOS = {"0": -100, "2": -100}
CANCELLED = re.compile(r"generation for \S+ cancelled after (\d+) of at most (\d+) tokens")


@pytest.fixture(scope="module")
def server(api_server: Server) -> Server:
    """The session's API server: these tests read its log from an offset, so sharing it is safe."""
    return api_server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    c = server.client("chat-faults")
    c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # model loaded before timing out
    return c


def log_since(server: Server, offset: int) -> str:
    return server.log.read_bytes()[offset:].decode("utf-8", "replace")


def wait_for_log(
    server: Server, offset: int, pattern: re.Pattern[str], timeout: float = 300
) -> re.Match[str]:
    deadline = time.monotonic() + timeout  # a guard against hanging, not a speed assertion
    while (m := pattern.search(log_since(server, offset))) is None:
        assert time.monotonic() < deadline, f"{pattern.pattern!r} never logged"
        time.sleep(0.1)
    return m


def test_abandoned_non_streamed_request_frees_the_model(server: Server, client: openai.OpenAI) -> None:
    offset = server.log.stat().st_size
    impatient = client.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):  # the client gives up and closes the connection
        impatient.chat.completions.create(
            model=MODEL, messages=HI, n=16, max_tokens=2000, logit_bias=NO_EOS, temperature=1
        )
    # The next request needs the same model (one generation at a time): it is answered once the
    # abandoned one is stopped, long before its 32,000 tokens could have been generated.
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert out.choices[0].finish_reason in ("stop", "length")
    cancelled = wait_for_log(server, offset, CANCELLED)
    generated, budget = int(cancelled[1]), int(cancelled[2])
    assert budget == 16 * 2000 and generated < budget
    # Ordering: the cancellation was logged before the follow-up request was answered.
    text = log_since(server, offset)
    assert text.index(cancelled[0]) < text.rindex('"POST /v1/chat/completions HTTP/1.1" 200')


def test_closed_stream_stops_generation(server: Server, client: openai.OpenAI) -> None:
    offset = server.log.stat().st_size
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, n=4, max_tokens=2000, logit_bias=NO_EOS, stream=True
    )
    received = [next(stream) for _ in range(3)]
    assert received[0].choices[0].delta.role == "assistant"
    stream.close()
    cancelled = wait_for_log(server, offset, CANCELLED)
    assert int(cancelled[1]) < int(cancelled[2]) == 4 * 2000
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).choices


def test_n_above_128_is_refused_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, n=129, max_tokens=1)
    assert err.value.param == "n"


def test_n_times_max_tokens_is_capped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, n=64, max_tokens=1024)
    assert err.value.param == "n"
    assert "65536" in err.value.message and "32768" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=40000)
    assert err.value.param == "max_completion_tokens"


def test_prompt_too_long_is_refused_before_tokenizing(server: Server, client: openai.OpenAI) -> None:
    offset = server.log.stat().st_size
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 1_000_000}], max_tokens=1
        )
    assert err.value.param == "messages"
    assert (
        "5,000,000 characters" in err.value.message and "context window of 4096 tokens" in err.value.message
    )
    assert "Traceback" not in log_since(server, offset)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [500, 900])
@pytest.mark.parametrize("where", ["tools", "tool_calls"])
def test_deep_nesting_is_a_400(server: Server, client: openai.OpenAI, depth: int, where: str) -> None:
    # Built as text: Python's own JSON encoder (and so the SDK) cannot even write 900 levels.
    if where == "tools":
        extra = (
            f'"tools": [{{"type": "function", "function": {{"name": "f", "parameters": {nested(depth)}}}}}]'
        )
        messages = '[{"role": "user", "content": "hi"}]'
    else:
        extra = '"max_tokens": 1'
        call = (
            f'{{"id": "c1", "type": "function", "function": {{"name": "f", "arguments": {nested(depth)}}}}}'
        )
        messages = (
            f'[{{"role": "user", "content": "hi"}}, {{"role": "assistant", "tool_calls": [{call}]}}, '
            '{"role": "tool", "tool_call_id": "c1", "content": "ok"}]'
        )
    body = f'{{"model": "{MODEL}", "messages": {messages}, {extra}}}'
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        content=body.encode(),
        headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == ("tools" if where == "tools" else "messages")
    # tools[i].function.parameters: 3 levels around the payload; messages[i].tool_calls[j].function: 5.
    levels = depth + (3 if where == "tools" else 5)
    assert f"nested {levels} levels deep, more than the limit of 64" in error["message"]


def test_moderate_nesting_still_works(client: openai.OpenAI) -> None:
    schema: dict = {"type": "string"}
    for _ in range(12):  # a realistic, deep-ish JSON schema
        schema = {"type": "object", "properties": {"inner": schema}}
    out = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=1,
        tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}],
    )
    assert out.choices and out.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:  # still deep enough to be refused via the SDK
        deep: dict = {}
        for _ in range(100):
            deep = {"a": deep}
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=1,
            tools=[{"type": "function", "function": {"name": "f", "parameters": deep}}],
        )
    assert err.value.param == "tools" and "limit of 64" in err.value.message


@pytest.mark.slow  # its own server, and 128 rows decoding while it shuts down
def test_sigterm_ends_the_server_during_an_n128_request(tmp_path: Path) -> None:
    server = start_server(tmp_path / "home", "--no-worker")
    try:
        c = server.client("sigterm")
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        offset = server.log.stat().st_size
        busy = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {c.api_key}"})
        with busy.stream(
            "POST",
            "/chat/completions",
            json={
                "model": MODEL,
                "messages": HI,
                "n": 128,
                "max_tokens": 256,
                "logit_bias": NO_EOS,
                "stream": True,
            },
            timeout=600,
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            server.proc.send_signal(signal.SIGTERM)
            said = wait_for_log(server, offset, re.compile(r"openft: SIGTERM: stopping: .*"))
            assert "Press Ctrl-C again to stop at once" in said[0]
            # The server stops the 32,768-token generation, tells the client why, and exits.
            rest = list(lines)
            assert server.proc.wait(timeout=300) == 0
        assert "data: [DONE]" not in rest
        assert any("The server is shutting down" in line for line in rest)
        log = log_since(server, offset)
        cancelled = CANCELLED.search(log)
        assert cancelled and int(cancelled[1]) < int(cancelled[2]) == 128 * 256
        assert "Traceback" not in log
    finally:
        server.stop()
