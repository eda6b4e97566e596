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

from openft.errors import InvalidRequest
from openft.protocol.common import OmitUnset, Request, check_depth

ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
ImageDetail = Literal["auto", "low", "high"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]

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
    # Extension (vLLM / DeepSeek): what a reasoning model's reply carries, so a client that sends
    # the reply back in the next request keeps it.
    reasoning_content: str | None = None
    """Assistant messages of a reasoning model: the reasoning of that reply (rendered as the
    model's template renders reasoning; Qwen3 keeps it only after the last user message)."""

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id'")
        return self

    def texts(self) -> list[str]:
        """The message's text: its string content or its text parts."""
        if isinstance(self.content, str):
            return [self.content]
        return [p.text for p in self.content or () if isinstance(p, TextContentPart)]


class StreamOptions(Request):
    include_usage: bool | None = None
    """If true, one extra chunk with ``choices: []`` and the request's ``usage`` comes before ``[DONE]``."""
    include_obfuscation: bool | None = None
    """Accepted; no obfuscation padding is sent."""


class FunctionDefinition(Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    """The function's name: letters, digits, ``_`` and ``-``, at most 64."""
    description: str | None = None
    """What the function does (rendered into the prompt by the chat template)."""
    parameters: dict[str, Any] | None = None
    """JSON schema of the arguments object; omitted means no arguments (``{}``)."""
    strict: bool | None = None
    """Whether arguments must match ``parameters`` exactly. Calls forced by ``tool_choice`` are
    always constrained to the schema; with ``strict`` an unsupported schema feature is a 400."""


class Tool(Request):
    type: Literal["function"]
    """Only function tools (``custom`` tools are not supported)."""
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """The JSON schema the reply must match (``schema`` on the wire); omitted = any JSON value."""
    strict: bool | None = None
    """True: a schema feature the grammar engine cannot enforce is a 400 naming it. False/null:
    such keywords are ignored (the reply is still valid JSON)."""


class TextFormat(Request):
    type: Literal["text"]


class JsonObjectFormat(Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]

_UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    # (parameter, values that mean "off" and are accepted, why it is refused)
    ("audio", (), "no audio output"),
    ("modalities", (["text"],), "text output only"),
    ("prediction", (), "no predicted outputs"),
    ("verbosity", (), "the served models have no verbosity control"),
    ("service_tier", ("auto", "default"), "one service tier"),
    ("web_search_options", (), "no web search"),
    ("moderation", (), "no output moderation on chat completions"),
    ("functions", (), "legacy functions: send them as 'tools'"),
    ("function_call", (), "legacy function_call: use 'tool_choice'"),
    ("prompt_cache_retention", ("in_memory",), "no extended prompt cache"),
    ("prompt_cache_options", (), "no prompt cache"),
)


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
    tools: list[Tool] | None = None
    """Function tools. Rendered into the prompt by the chat template; replies in the family's
    tool-call format are parsed into ``message.tool_calls`` (see ``models.tool_calls``)."""
    tool_choice: ToolChoice | None = None
    """``none`` (never call), ``auto`` (the model decides; the default with tools),
    ``required`` (at least one call) or one named function. ``required`` and a named function
    are enforced by constrained decoding: the reply is a call whose arguments match the schema."""
    parallel_tool_calls: bool | None = None
    """Default true. False: at most one tool call per reply (enforced when decoding is constrained,
    and only the first call is returned otherwise)."""
    response_format: ResponseFormat | None = None
    """``text``, ``json_object`` (any JSON object) or ``json_schema``: both JSON kinds are enforced
    by constrained decoding, so the content always parses (and validates against the schema)."""
    user: str | None = None
    """Deprecated end-user identifier; only logged with the request (no abuse tracking here)."""
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    """End-user identifier; only logged with the request (no abuse tracking here)."""
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    """Up to 16 key-value pairs; only logged with the request (completions are never stored)."""
    store: bool | None = None
    """Only ``false``/null: completions are never stored (``true`` is refused)."""
    prompt_cache_key: str | None = None
    """Accepted as the hint it is: there is no prompt cache (``cached_tokens`` is always 0)."""

    # Spec parameters openft does not implement. Typed loosely so any value parses; anything
    # other than null (or the one value that means "off") is refused by ``refuse_unsupported``.
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: ReasoningEffort | None = None
    """Reasoning models with a thinking switch (Qwen3's ``enable_thinking``): ``none`` /
    ``minimal`` turn thinking off, ``medium`` (the default) and above keep it on, ``low`` is
    refused (the model thinks fully or not at all). Other models accept only ``none``."""
    service_tier: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    functions: Any = None
    function_call: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None

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

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is not in 'tools'"
                    + (f" (defined: {', '.join(sorted(names))})" if names else "")
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs at least one function in 'tools'")
        return self

    def refuse_unsupported(self) -> None:
        """Raise ``InvalidRequest`` for the first parameter openft would otherwise ignore.

        Silent acceptance is the worst answer: code that works against OpenAI would seem to work
        here and then misbehave. So every spec parameter is either honoured or refused here.
        """
        for name, allowed, why in _UNSUPPORTED:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise InvalidRequest(
                    f"'{name}' is not supported by openft ({why}); remove it from the request",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.store:
            raise InvalidRequest(
                "'store': true is not supported by openft (chat completions are never stored); "
                "remove it or send false",
                param="store",
                code="unsupported_parameter",
            )
        hint = " (not supported by openft; remove it)"
        self.refuse_extra(hint=hint)
        for i, m in enumerate(self.messages):
            m.refuse_extra(f"messages[{i}].", hint)
        if isinstance(self.response_format, JsonObjectFormat) and not any(
            "json" in text.lower() for m in self.messages for text in m.texts()
        ):
            # OpenAI's rule and words: a model told nothing about JSON may write whitespace until
            # the token limit inside a JSON grammar.
            raise InvalidRequest(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of "
                "type 'json_object'.",
                param="messages",
            )

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


class FunctionCall(_Response):
    name: str
    arguments: str
    """The arguments as a JSON object in a string (as OpenAI sends them)."""


class ToolCall(_Response):
    id: str
    """``call_...``: what a ``tool`` message's ``tool_call_id`` answers."""
    type: Literal["function"] = "function"
    function: FunctionCall


class CompletionMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """The generated text (stop sequence excluded); null when the reply is only tool calls. A
    reasoning model's thinking block is not part of it (see ``reasoning_content``)."""
    refusal: str | None = None
    """Always null (required by the spec)."""
    tool_calls: list[ToolCall] | None = None
    """The calls parsed from the reply in the model family's tool-call format; left out if none."""
    # Extension, named as vLLM and DeepSeek's API name it; the spec allows extra keys here.
    reasoning_content: str | None = None
    """A reasoning model's thinking (Qwen3's ``<think>`` block, tags and surrounding newlines
    dropped); left out for models that do not reason or replies without a block."""

    omit_if_none = ("tool_calls", "reasoning_content")


class Choice(_Response):
    index: int
    """Position of this choice (0..n-1)."""
    message: CompletionMessage
    logprobs: ChoiceLogprobs | None = None
    """Token log probabilities when the request asked for ``logprobs``, else null."""
    finish_reason: FinishReason
    """``stop`` (end of turn or a stop sequence), ``length`` (the token cap or the context window)
    or ``tool_calls`` (the reply is tool calls)."""


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


class ChunkFunctionCall(_Response):
    name: str | None = None
    """Only on a call's first delta."""
    arguments: str | None = None
    """The next piece of the arguments string."""

    omit_if_none = ("name", "arguments")


class ChunkToolCall(_Response):
    index: int
    """Which call of this choice the delta belongs to (0, 1, ...)."""
    id: str | None = None
    """Only on a call's first delta, with ``type`` and ``function.name``."""
    type: Literal["function"] | None = None
    function: ChunkFunctionCall | None = None

    omit_if_none = ("id", "type", "function")


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    """Only on a choice's first chunk."""
    content: str | None = None
    """The next piece of text."""
    refusal: str | None = None
    """Never sent."""
    tool_calls: list[ChunkToolCall] | None = None
    """Tool-call pieces: id and name first, then the arguments in pieces."""
    reasoning_content: str | None = None
    """Extension (as vLLM streams it): the next piece of a reasoning model's thinking."""

    omit_if_none = ("role", "content", "refusal", "tool_calls", "reasoning_content")


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
