"""Chat completions: the create request, the ``chat.completion`` object and its streamed chunks.

Field names, ranges and required-ness mirror the OpenAPI schemas ``CreateChatCompletionRequest``,
``CreateChatCompletionResponse`` and ``CreateChatCompletionStreamResponse``. Requests accept
unknown fields (newer SDKs send more) and log their names; the response types serialize so
that the plain ``model_dump(mode="json")`` validates against the spec: keys the spec marks
required-but-nullable (``message.refusal``, ``choice.logprobs``, ``chunk.finish_reason``) are
always present, optional object-typed keys (``usage`` on a completion, ``delta.role``...) are
left out rather than sent as ``null``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from openft.protocol.common import OmitUnset, Request, check_depth

ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
ImageDetail = Literal["auto", "low", "high"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]

# --------------------------------------------------------------------------- request


class ImageURL(Request):
    url: str
    """An http(s) URL of the image, or the image itself as a ``data:image/...;base64,...`` URL."""
    detail: ImageDetail = "auto"
    """Requested fidelity. Kept on the internal message; the processor's own resizing decides the tokens."""


class TextContentPart(Request):
    type: Literal["text"]
    text: str
    """The text."""


class ImageContentPart(Request):
    type: Literal["image_url"]
    image_url: ImageURL
    """Where the image is (a URL or a data URL) and at what detail."""


class RefusalContentPart(Request):
    type: Literal["refusal"]
    refusal: str
    """A refusal the assistant gave earlier (assistant messages only); rendered as its text."""


ContentPart = Annotated[
    TextContentPart | ImageContentPart | RefusalContentPart,
    Field(discriminator="type"),
]


class ChatMessage(Request):
    """One message of the conversation (all five spec roles in one type; ``function`` is not served)."""

    role: ChatRole
    """Author of the message: ``system``, ``developer``, ``user``, ``assistant`` or ``tool``."""
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    """A string or a list of parts (``text``, ``image_url``; ``refusal`` for assistants).

    Required except on an assistant message that carries ``tool_calls``."""
    name: str | None = None
    """Optional participant name."""
    refusal: str | None = None
    """Assistant messages: a refusal the model gave earlier."""
    tool_calls: list[dict[str, Any]] | None = None
    """Assistant messages: the tool calls it made (passed to the chat template as given)."""
    tool_call_id: str | None = None
    """Tool messages: the id of the call this message answers."""

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id'")
        return self


class StreamOptions(Request):
    include_usage: bool | None = None
    """If true, one extra chunk with ``choices: []`` and the request's ``usage`` comes before ``[DONE]``."""
    include_obfuscation: bool | None = None
    """Accepted; no obfuscation padding is sent."""


class ChatCompletionRequest(Request):
    """``POST /v1/chat/completions``. Unknown fields are accepted and logged (see ``Request``)."""

    model: str
    """A base model name or a fine-tuned ``ft:...`` id."""
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    """The conversation so far (at least one message)."""
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """Upper bound on generated tokens per choice. Default: ``inference.chat.DEFAULT_MAX_TOKENS``,
    bounded by the model's context window."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Deprecated alias of ``max_completion_tokens`` (which wins if both are given)."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    """Sampling temperature 0-2 (default 1). 0 means greedy decoding, fully deterministic."""
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    """Nucleus sampling mass 0-1 (default 1)."""
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    """How many choices to generate (1-128, default 1)."""
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4)] | None = None
    """Up to 4 strings; generation ends before the first one and the returned text excludes it."""
    stream: bool | None = None
    """If true the answer comes as server-sent ``chat.completion.chunk`` events ending in ``[DONE]``."""
    stream_options: StreamOptions | None = None
    """Streaming options (only meaningful with ``stream: true``)."""
    seed: int | None = None
    """Deprecated by OpenAI; here it makes sampling reproducible for the same model and request."""
    logprobs: bool | None = None
    """Return the log probability of each generated token (of the model's raw distribution)."""
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    """0-20 most likely alternatives per position; needs ``logprobs: true``."""
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    """-2..2: subtracted from a token's logit once per earlier occurrence in the completion."""
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    """-2..2: subtracted from a token's logit if it already occurs in the completion."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    """Token id (as a string) -> bias -100..100 added to its logit before choosing."""
    tools: list[dict[str, Any]] | None = None
    """Tool definitions. Rendered into the prompt by the chat template if it supports tools, but
    no constrained decoding: the answer is always plain ``content`` (no ``tool_calls``)."""
    tool_choice: str | dict[str, Any] | None = None
    """Accepted; not enforced (see ``tools``)."""
    parallel_tool_calls: bool | None = None
    """Accepted; not enforced (see ``tools``)."""
    response_format: dict[str, Any] | None = None
    """Accepted (``text``, ``json_object``, ``json_schema``); not enforced: no constrained decoding."""
    user: str | None = None
    """Deprecated end-user identifier; accepted and ignored."""
    metadata: dict[str, str] | None = None
    """Up to 16 key-value pairs; accepted and ignored (completions are not stored)."""
    store: bool | None = None
    """Accepted; completions are never stored."""

    # Free-form JSON fields: bounded nesting, so the chat template and JSON encoders never recurse
    # past Python's limit (hundreds of levels gave a 500).
    @field_validator("messages", "tools", "tool_choice", "response_format", mode="before")
    @classmethod
    def _bounded_depth(cls, v: Any) -> Any:
        return check_depth(v)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v > 0 and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @field_validator("response_format")
    @classmethod
    def _known_response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be one of 'text', 'json_object', 'json_schema'")
        return v

    # Small conversions the engine needs, so the rules live next to the fields.

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens``, else None (server default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple, empty strings dropped (they would stop before the first token)."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# -------------------------------------------------------------------------- response


class _Response(OmitUnset):
    """Base for response objects: the fields named in ``omit_if_none`` are left out when None.

    The spec types those keys as objects or strings (not nullable), so ``null`` would be invalid,
    while other nullable keys (``refusal``, ``logprobs``, ``finish_reason``) must be sent as null.
    """


class TopLogprob(_Response):
    token: str
    """The token's text."""
    logprob: float
    """Its log probability under the model's (untempered) distribution."""
    bytes: list[int] | None
    """Its UTF-8 bytes (a token may hold part of a multi-byte character)."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    """The ``top_logprobs`` most likely tokens at this position, most likely first."""


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    """One entry per generated token (the end-of-turn token is not listed)."""
    refusal: list[TokenLogprob] | None = None
    """Always null: refusals are never generated separately."""


class CompletionMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """The generated text (stop sequence excluded)."""
    refusal: str | None = None
    """Always null (required by the spec)."""


class Choice(_Response):
    index: int
    """Position of this choice (0..n-1)."""
    message: CompletionMessage
    logprobs: ChoiceLogprobs | None = None
    """Token log probabilities when the request asked for ``logprobs``, else null."""
    finish_reason: FinishReason
    """``stop`` (end of turn or a stop sequence) or ``length`` (the token cap or the context window)."""


class PromptTokensDetails(_Response):
    cached_tokens: int = 0
    """Always 0: no prompt cache."""
    image_tokens: int | None = None
    """Prompt tokens that stand for images (extension present in the spec, not in every SDK)."""

    omit_if_none = ("image_tokens",)


class Usage(_Response):
    prompt_tokens: int
    """Tokens in the rendered prompt, image placeholder tokens included (counted once for all ``n``)."""
    completion_tokens: int
    """Generated tokens summed over all choices (an end-of-turn token counts)."""
    total_tokens: int
    """prompt_tokens + completion_tokens."""
    prompt_tokens_details: PromptTokensDetails | None = None
    """Breakdown of the prompt tokens."""

    omit_if_none = ("prompt_tokens_details",)


class ChatCompletionResponse(_Response):
    id: str
    """``chatcmpl-...``."""
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    """Unix seconds."""
    model: str
    """The model id the request named."""
    choices: list[Choice]
    usage: Usage | None = None
    """Token counts for the whole request."""
    system_fingerprint: str | None = None
    """Deprecated; left out unless set."""

    omit_if_none = ("usage", "system_fingerprint")


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    """Only on a choice's first chunk."""
    content: str | None = None
    """The next piece of text."""
    refusal: str | None = None
    """Never sent."""

    omit_if_none = ("role", "content", "refusal")


class ChunkChoice(_Response):
    index: int
    """Which choice this delta belongs to."""
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    """Log probabilities of the tokens behind this delta (when requested), else null."""
    finish_reason: FinishReason | None = None
    """Null until the choice's last chunk."""


class ChatCompletionChunk(_Response):
    id: str
    """Same for every chunk of one completion."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    """Same for every chunk of one completion."""
    model: str
    choices: list[ChunkChoice]
    """Usually one entry; empty on the final usage chunk."""
    usage: Usage | None = None
    """Null except on the extra last chunk sent when ``stream_options.include_usage`` is true."""
    system_fingerprint: str | None = None
    """Deprecated; left out unless set."""

    omit_if_none = ("system_fingerprint",)
