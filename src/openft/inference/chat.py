"""Chat completions: a ``ChatCompletionRequest`` in, a ``chat.completion`` (or its chunks) out.

request messages -> ``datasets.formats.Message`` (images fetched/decoded by ``image_loader``)
-> ``models.render.render_chat(add_generation_prompt=True)`` (the same rendering training used)
-> ``engine.generate`` -> protocol objects.

Tools are rendered into the prompt by the chat template; replies in the family's tool-call
format come back as ``tool_calls``, and ``tool_choice``/``response_format`` are enforced by
constrained decoding (``inference.tools``, ``inference.constrain``).

Reasoning models (Qwen3's ``<think>`` blocks, :mod:`openft.models.thinking`): the block is split
off the reply into ``message.reasoning_content`` (streamed as ``delta.reasoning_content``), so
``content`` is the answer; tool calls and JSON are read from the answer. ``reasoning_effort``
switches thinking off (``none``/``minimal``); constrained decoding turns it off too (the grammar
makes the reply start with the call or the JSON, so there is no room for a block).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from openft import ids
from openft.datasets.formats import ImagePart, Message, Part, TextPart
from openft.datasets.images import ImageRejected, inspect_image
from openft.errors import InvalidRequest
from openft.inference import engine, tools
from openft.inference.engine import ChoiceFinished, Prompt, SamplingParams, TextDelta
from openft.inference.registry import LoadedModel
from openft.models.render import render_chat
from openft.models.thinking import (
    OPEN,
    Thinking,
    ThinkingStream,
    enable_thinking_for,
    split_reply,
    thinking_of,
)
from openft.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionMessage,
    ImageContentPart,
    PromptTokensDetails,
    RefusalContentPart,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""Completion cap when the request sets neither ``max_completion_tokens`` nor ``max_tokens``
(always also bounded by the room left in the model's context window)."""

MAX_CHARS_PER_TOKEN = 32
"""Cap on the characters one token may be assumed to cover when bounding a prompt before
tokenizing it (the model's longest vocabulary entry, if shorter, is used instead). Real text
averages 3-5 characters per token, so only prompts that cannot possibly fit are refused."""

ImageLoader = Callable[[str], bytes]


def check_request_size(
    loaded: LoadedModel, request: ChatCompletionRequest, *, max_completion_tokens_per_request: int
) -> None:
    """Refuse what cannot be served before any image is decoded or any text tokenized.

    - ``n`` x the per-choice cap (``max_completion_tokens``/``max_tokens``, else the server's
      default) must stay within ``max_completion_tokens_per_request``.
    - The prompt's text must be short enough that it could fit the context window: a model's
      tokens cover at most ``chars_per_token(loaded)`` characters each, so more characters than
      ``context_length`` times that can never fit, and tokenizing them (seconds of CPU, gigabytes
      for a 20 MB body) is skipped.
    """
    n = request.n or 1
    per_choice = request.max_new_tokens or DEFAULT_MAX_TOKENS
    if n * per_choice > max_completion_tokens_per_request:
        cap = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        shown = (
            f"{cap}={per_choice}"
            if request.max_new_tokens is not None
            else f"the default {per_choice} tokens"
        )
        raise InvalidRequest(
            f"n={n} choices x {shown} = {n * per_choice} completion tokens is more than this server allows "
            f"per request ({max_completion_tokens_per_request}, OPENFT_MAX_COMPLETION_TOKENS_PER_REQUEST); "
            f"lower n or {cap}",
            param="n" if n > 1 else cap,
        )
    if loaded.context_length is None:
        return
    limit = loaded.context_length * chars_per_token(loaded)
    chars = prompt_chars(request)
    if chars > limit:
        raise InvalidRequest(
            f"the prompt has {chars:,} characters of text; this model's context window of "
            f"{loaded.context_length} tokens holds at most about {limit:,}, so it cannot fit; shorten the "
            "conversation",
            param="messages",
        )


def chars_per_token(loaded: LoadedModel) -> int:
    """Most characters one token of this model is assumed to stand for (see MAX_CHARS_PER_TOKEN)."""
    return max(1, min(loaded.longest_token_chars, MAX_CHARS_PER_TOKEN))


def prompt_chars(request: ChatCompletionRequest) -> int:
    """Characters of text the prompt will contain (content, names, tool calls, tool schemas)."""
    total = sum(len(t.model_dump_json(exclude_none=True)) for t in request.tools or ())
    for m in request.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            for part in m.content:
                if isinstance(part, RefusalContentPart):
                    total += len(part.refusal)
                elif not isinstance(part, ImageContentPart):
                    total += len(part.text)
        total += len(m.refusal or "") + len(m.name or "") + len(m.reasoning_content or "")
        if m.tool_calls:
            total += len(json.dumps(m.tool_calls))
    return total


def create_completion(
    loaded: LoadedModel,
    request: ChatCompletionRequest,
    *,
    image_loader: ImageLoader,
    cancel: threading.Event | None = None,
) -> ChatCompletionResponse:
    """Generate the whole answer (``n`` choices) and return it as one ``chat.completion``.

    ``cancel`` set from another thread (the client went away) stops generation at the next token
    and raises ``engine.GenerationCancelled``.
    """
    prompt, n_image_tokens = build_prompt(loaded, request, image_loader=image_loader)
    params, tool_plan = _params_and_plan(loaded, request, prompt)
    opened = _opens_thinking(loaded, prompt)
    n = request.n or 1
    texts = [""] * n
    logprobs: list[list[engine.TokenLogprob]] = [[] for _ in range(n)]
    finished: dict[int, ChoiceFinished] = {}
    for event in engine.generate(loaded, prompt, params, n=n, cancel=cancel):
        if isinstance(event, TextDelta):
            texts[event.index] += event.text
        else:
            finished[event.index] = event
        logprobs[event.index].extend(event.logprobs)
    choices = []
    for i in range(n):
        reasoning, answer = split_reply(texts[i], opened=opened) if opened is not None else (None, texts[i])
        reason = finished[i].finish_reason
        reply = tools.read_reply(tool_plan, answer, truncated=reason == "length")
        choices.append(
            Choice(
                index=i,
                message=CompletionMessage(
                    content=reply.content, tool_calls=tools.message_calls(reply), reasoning_content=reasoning
                ),
                logprobs=_logprobs(loaded, logprobs[i]) if params.logprobs else None,
                finish_reason=tools.finish_reason(reply, reason),
            )
        )
    return ChatCompletionResponse(
        id=ids.chat_completion_id(),
        created=int(time.time()),
        model=request.model,
        choices=choices,
        usage=_usage(prompt, n_image_tokens, finished.values()),
    )


def stream_completion(
    loaded: LoadedModel,
    request: ChatCompletionRequest,
    *,
    image_loader: ImageLoader,
    cancel: threading.Event | None = None,
) -> Iterator[ChatCompletionChunk]:
    """The same answer as ``create_completion``, as chunks (choices one after the other).

    Per choice: a ``{"role": "assistant", "content": ""}`` chunk, content chunks as text is
    generated, then an empty delta with ``finish_reason``. With ``stream_options.include_usage``
    one last chunk has ``choices: []`` and the usage. Request errors (bad image, prompt too long)
    raise before the first chunk is produced, so the API can still answer 400. ``cancel`` as in
    ``create_completion``.
    """
    prompt, n_image_tokens = build_prompt(loaded, request, image_loader=image_loader)
    params, tool_plan = _params_and_plan(loaded, request, prompt)
    opened = _opens_thinking(loaded, prompt)
    return _stream(loaded, request, prompt, n_image_tokens, params, tool_plan, opened, cancel)


def _params_and_plan(
    loaded: LoadedModel, request: ChatCompletionRequest, prompt: Prompt
) -> tuple[SamplingParams, tools.ToolPlan]:
    params = sampling_params(loaded, request, prompt_tokens=len(prompt.input_ids))
    tool_plan = tools.plan(loaded, request)
    params = dataclasses.replace(
        params, constraint=tools.constraint_factory(loaded, tool_plan), keep_tokens=tool_plan.keep_tokens
    )
    return params, tool_plan


def _stream(
    loaded: LoadedModel,
    request: ChatCompletionRequest,
    prompt: Prompt,
    n_image_tokens: int,
    params: SamplingParams,
    tool_plan: tools.ToolPlan,
    opened: bool | None,
    cancel: threading.Event | None,
) -> Iterator[ChatCompletionChunk]:
    completion_id, created = ids.chat_completion_id(), int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id, created=created, model=request.model, choices=choices, usage=usage
        )

    def lp(items: tuple[engine.TokenLogprob, ...]) -> ChoiceLogprobs | None:
        return _logprobs(loaded, items) if params.logprobs else None

    started: set[int] = set()
    finished: list[ChoiceFinished] = []
    gates: dict[int, tools.ContentGate] = {}
    # Reasoning models: the thinking block goes out as reasoning deltas, the rest through the gate.
    thoughts: dict[int, ThinkingStream] = {}
    held: dict[int, list[engine.TokenLogprob]] = {}  # logprobs of text the gate holds back
    events = engine.generate(loaded, prompt, params, n=request.n or 1, cancel=cancel)
    try:
        for event in events:
            i = event.index
            if i not in started:
                started.add(i)
                gates[i], held[i] = tools.ContentGate(tool_plan), []
                if opened is not None:
                    thoughts[i] = ThinkingStream(opened=opened)
                yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
            held[i].extend(event.logprobs)
            if isinstance(event, TextDelta):
                thought, answer = thoughts[i].feed(event.text) if i in thoughts else ("", event.text)
                text, calls = gates[i].feed(answer) if answer else ("", [])
                if thought or text:
                    delta = ChunkDelta(content=text or None, reasoning_content=thought or None)
                    yield chunk([ChunkChoice(index=i, delta=delta, logprobs=lp(tuple(held[i])))])
                    held[i].clear()
                for call in calls:  # one delta per chunk, as OpenAI streams them
                    yield chunk([ChunkChoice(index=i, delta=ChunkDelta(tool_calls=[call]))])
            else:
                finished.append(event)
                thought, answer = thoughts[i].finish() if i in thoughts else ("", "")
                early, calls = gates[i].feed(answer) if answer else ("", [])
                rest, more, reply = gates[i].finish(truncated=event.finish_reason == "length")
                text = early + rest
                if thought or text:
                    delta = ChunkDelta(content=text or None, reasoning_content=thought or None)
                    yield chunk([ChunkChoice(index=i, delta=delta)])
                for call in [*calls, *more]:  # one delta per chunk, as OpenAI streams them
                    yield chunk([ChunkChoice(index=i, delta=ChunkDelta(tool_calls=[call]))])
                # Tokens not tied to any sent text (a stop string's, a tool call's) still get
                # their logprobs reported.
                logprobs = lp(tuple(held[i])) if held[i] else None
                choice = ChunkChoice(
                    index=i,
                    delta=ChunkDelta(),
                    logprobs=logprobs,
                    finish_reason=tools.finish_reason(reply, event.finish_reason),
                )
                yield chunk([choice])
    finally:
        events.close()  # a client that went away cancels the generation
    if request.include_usage:
        yield chunk([], usage=_usage(prompt, n_image_tokens, finished))


# ------------------------------------------------------------------------------- the prompt


def to_messages(
    request: ChatCompletionRequest, *, image_loader: ImageLoader, thinking: Thinking | None = None
) -> list[Message]:
    """Request messages as internal ``Message``s: content as parts, images as their bytes.

    An assistant message's ``reasoning_content`` becomes a ``<think>`` block before its text,
    which rendering splits off again for the template (models with reasoning only)."""
    return [_to_message(i, m, image_loader, thinking) for i, m in enumerate(request.messages)]


def _to_message(i: int, m: ChatMessage, image_loader: ImageLoader, thinking: Thinking | None) -> Message:
    parts: list[Part] = []
    if m.reasoning_content is not None:
        if m.role != "assistant" or thinking is None:
            raise InvalidRequest(
                f"messages[{i}].reasoning_content: only assistant messages to a reasoning model "
                "(a Qwen3-style chat template) carry reasoning; remove it",
                param=f"messages[{i}].reasoning_content",
            )
        parts.append(TextPart(f"{OPEN}\n{m.reasoning_content}\n</think>\n\n"))
    if isinstance(m.content, str):
        parts.append(TextPart(m.content))
    elif m.content is not None:
        for j, part in enumerate(m.content):
            if isinstance(part, ImageContentPart):
                if m.role != "user":
                    raise InvalidRequest(
                        f"messages[{i}]: image content is only allowed in user messages, not {m.role}",
                        param=f"messages[{i}].content[{j}]",
                    )
                where = f"messages[{i}].content[{j}].image_url.url"
                try:
                    data = image_loader(part.image_url.url)
                    # Same checks as training data (format, decodes fully, pixel limit), so a
                    # broken or hostile image is a 400 here rather than a crash in the processor.
                    inspect_image(data)
                except InvalidRequest as exc:
                    exc.param = exc.param or where
                    raise
                except ImageRejected as exc:
                    raise InvalidRequest(f"{where}: {exc.message}", param=where, code=exc.code) from exc
                parts.append(
                    ImagePart(
                        # A data URL can be megabytes; the bytes are kept, the URL is not needed.
                        url=part.image_url.url if not part.image_url.url.startswith("data:") else "data:",
                        detail=part.image_url.detail,
                        data=data,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
            elif isinstance(part, RefusalContentPart):
                parts.append(TextPart(part.refusal))
            else:
                parts.append(TextPart(part.text))
    elif m.refusal:
        parts.append(TextPart(m.refusal))
    return Message(
        role=m.role,
        content=tuple(parts),
        name=m.name,
        tool_calls=tuple(m.tool_calls) if m.tool_calls else None,
        tool_call_id=m.tool_call_id,
    )


def build_prompt(
    loaded: LoadedModel, request: ChatCompletionRequest, *, image_loader: ImageLoader
) -> tuple[Prompt, int]:
    """Render the request's conversation with the model's chat template (generation prompt added).

    Returns the prompt and how many of its tokens stand for images.
    """
    thinking = thinking_of(loaded.processor)
    messages = to_messages(request, image_loader=image_loader, thinking=thinking)
    rendered = render_chat(
        loaded.processor,
        messages,
        tools=[t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None,
        add_generation_prompt=True,
        enable_thinking=_enable_thinking(thinking, request),
    )
    return Prompt(input_ids=rendered.input_ids, vision=rendered.vision), rendered.n_image_tokens


def _enable_thinking(thinking: Thinking | None, request: ChatCompletionRequest) -> bool | None:
    """``reasoning_effort`` as the template's ``enable_thinking``; off under a grammar (the reply
    must start with the call or the JSON), where asking for thinking is refused."""
    enable = enable_thinking_for(thinking, request.reasoning_effort)
    if thinking is None or not thinking.switch or not tools.is_constrained(request):
        return enable
    if enable:
        raise InvalidRequest(
            f"reasoning_effort {request.reasoning_effort!r} cannot be combined with a forced tool call or JSON "
            "output: constrained replies start with the call or the JSON, with no thinking; send "
            "reasoning_effort 'none' or leave it out",
            param="reasoning_effort",
        )
    return False


def _opens_thinking(loaded: LoadedModel, prompt: Prompt) -> bool | None:
    """None for a model without reasoning; else whether the prompt leaves a ``<think>`` block
    open (some templates start the block in the generation prompt), so the reply begins inside it."""
    if thinking_of(loaded.processor) is None:
        return None
    tail = loaded.tokenizer.decode(prompt.input_ids[-8:])
    return tail.rstrip().endswith(OPEN)


def sampling_params(
    loaded: LoadedModel, request: ChatCompletionRequest, *, prompt_tokens: int
) -> SamplingParams:
    """Request knobs -> engine parameters, with OpenAI's defaults and the context-window bound."""
    room = None if loaded.context_length is None else loaded.context_length - prompt_tokens
    if room is not None and room < 1:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens (images included) but the model's context window is "
            f"{loaded.context_length}; shorten the conversation or use fewer or low-detail images",
            param="messages",
        )
    wanted = request.max_new_tokens or DEFAULT_MAX_TOKENS
    if room is not None and request.max_new_tokens is not None and wanted > room:
        # An explicit cap that cannot fit is the user's to fix (OpenAI answers 400 here too).
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequest(
            f"{param}={wanted} plus the {prompt_tokens}-token prompt exceeds the model's context window of "
            f"{loaded.context_length} tokens; ask for at most {room}",
            param=param,
        )
    bias = _logit_bias(loaded, request.logit_bias)
    return SamplingParams(
        max_new_tokens=min(wanted, room) if room is not None else wanted,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_sequences,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=bias,
    )


def _logit_bias(loaded: LoadedModel, logit_bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    vocab = len(loaded.tokenizer)
    out = []
    for key, value in logit_bias.items():
        if not key.isdigit() or int(key) >= vocab:
            raise InvalidRequest(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1})", param="logit_bias"
            )
        out.append((int(key), float(value)))
    return tuple(out)


# ------------------------------------------------------------------------- response pieces


def _usage(prompt: Prompt, n_image_tokens: int, finished: Any) -> Usage:
    completion = sum(f.completion_tokens for f in finished)
    prompt_tokens = len(prompt.input_ids)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=0, image_tokens=n_image_tokens),
    )


def _logprobs(loaded: LoadedModel, items: Any) -> ChoiceLogprobs:
    tokenizer = loaded.tokenizer

    def top(token_id: int, logprob: float) -> TopLogprob:
        raw = engine.token_bytes(tokenizer, token_id)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    content = []
    for item in items:
        head = top(item.token_id, item.logprob)
        content.append(
            TokenLogprob(
                token=head.token,
                logprob=head.logprob,
                bytes=head.bytes,
                top_logprobs=[top(t, lp) for t, lp in item.top],
            )
        )
    return ChoiceLogprobs(content=content, refusal=None)
