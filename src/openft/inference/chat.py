"""Chat completions: a ``ChatCompletionRequest`` in, a ``chat.completion`` (or its chunks) out.

request messages -> ``datasets.formats.Message`` (images fetched/decoded by ``image_loader``)
-> ``models.render.render_chat(add_generation_prompt=True)`` (the same rendering training used)
-> ``engine.generate`` -> protocol objects.

Not supported, on purpose and documented: tools are rendered into the prompt when the chat
template supports them, but replies are never parsed into ``tool_calls`` (plain ``content``
only); ``response_format`` is accepted but not enforced (no constrained decoding).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from openft import ids
from openft.datasets.formats import ImagePart, Message, Part, TextPart
from openft.datasets.images import ImageRejected, inspect_image
from openft.errors import InvalidRequest
from openft.inference import engine
from openft.inference.engine import ChoiceFinished, Prompt, SamplingParams, TextDelta
from openft.inference.registry import LoadedModel
from openft.models.render import render_chat
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

ImageLoader = Callable[[str], bytes]


def create_completion(
    loaded: LoadedModel, request: ChatCompletionRequest, *, image_loader: ImageLoader
) -> ChatCompletionResponse:
    """Generate the whole answer (``n`` choices) and return it as one ``chat.completion``."""
    prompt, n_image_tokens = build_prompt(loaded, request, image_loader=image_loader)
    params = sampling_params(loaded, request, prompt_tokens=len(prompt.input_ids))
    n = request.n or 1
    texts = [""] * n
    logprobs: list[list[engine.TokenLogprob]] = [[] for _ in range(n)]
    finished: dict[int, ChoiceFinished] = {}
    for event in engine.generate(loaded, prompt, params, n=n):
        if isinstance(event, TextDelta):
            texts[event.index] += event.text
        else:
            finished[event.index] = event
        logprobs[event.index].extend(event.logprobs)
    choices = [
        Choice(
            index=i,
            message=CompletionMessage(content=texts[i]),
            logprobs=_logprobs(loaded, logprobs[i]) if params.logprobs else None,
            finish_reason=finished[i].finish_reason,
        )
        for i in range(n)
    ]
    return ChatCompletionResponse(
        id=ids.chat_completion_id(),
        created=int(time.time()),
        model=request.model,
        choices=choices,
        usage=_usage(prompt, n_image_tokens, finished.values()),
    )


def stream_completion(
    loaded: LoadedModel, request: ChatCompletionRequest, *, image_loader: ImageLoader
) -> Iterator[ChatCompletionChunk]:
    """The same answer as ``create_completion``, as chunks (choices one after the other).

    Per choice: a ``{"role": "assistant", "content": ""}`` chunk, content chunks as text is
    generated, then an empty delta with ``finish_reason``. With ``stream_options.include_usage``
    one last chunk has ``choices: []`` and the usage. Request errors (bad image, prompt too long)
    raise before the first chunk is produced, so the API can still answer 400.
    """
    prompt, n_image_tokens = build_prompt(loaded, request, image_loader=image_loader)
    params = sampling_params(loaded, request, prompt_tokens=len(prompt.input_ids))
    return _stream(loaded, request, prompt, n_image_tokens, params)


def _stream(
    loaded: LoadedModel,
    request: ChatCompletionRequest,
    prompt: Prompt,
    n_image_tokens: int,
    params: SamplingParams,
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
    events = engine.generate(loaded, prompt, params, n=request.n or 1)
    try:
        for event in events:
            if event.index not in started:
                started.add(event.index)
                yield chunk([ChunkChoice(index=event.index, delta=ChunkDelta(role="assistant", content=""))])
            if isinstance(event, TextDelta):
                delta = ChunkDelta(content=event.text)
                yield chunk([ChunkChoice(index=event.index, delta=delta, logprobs=lp(event.logprobs))])
            else:
                finished.append(event)
                # Tokens not tied to any text (a stop string's) still get their logprobs reported.
                logprobs = lp(event.logprobs) if event.logprobs else None
                choice = ChunkChoice(
                    index=event.index,
                    delta=ChunkDelta(),
                    logprobs=logprobs,
                    finish_reason=event.finish_reason,
                )
                yield chunk([choice])
    finally:
        events.close()  # a client that went away cancels the generation
    if request.include_usage:
        yield chunk([], usage=_usage(prompt, n_image_tokens, finished))


# ------------------------------------------------------------------------------- the prompt


def to_messages(request: ChatCompletionRequest, *, image_loader: ImageLoader) -> list[Message]:
    """Request messages as internal ``Message``s: content as parts, images as their bytes."""
    return [_to_message(i, m, image_loader) for i, m in enumerate(request.messages)]


def _to_message(i: int, m: ChatMessage, image_loader: ImageLoader) -> Message:
    parts: list[Part] = []
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
    if request.response_format and request.response_format.get("type") != "text":
        log.info(
            "response_format %s is not enforced (no constrained decoding)",
            request.response_format.get("type"),
        )
    messages = to_messages(request, image_loader=image_loader)
    rendered = render_chat(
        loaded.processor, messages, tools=request.tools or None, add_generation_prompt=True
    )
    return Prompt(input_ids=rendered.input_ids, vision=rendered.vision), rendered.n_image_tokens


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
