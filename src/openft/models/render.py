"""Render a conversation into model inputs: token ids, an assistant-only label mask, vision tensors.

Shared by training (labels) and chat inference (``add_generation_prompt=True``), so a model is
served with exactly the token layout it was trained on.

How it works, and why:

1. **The model's own chat template decides the layout.** We never hard-code role headers. Every
   user-controlled string (text parts, tool-call names/arguments, string values in tool schemas) is
   swapped for an inert ASCII sentinel before the template runs, so the rendered string contains
   only the template's own structure plus sentinels.
2. **User text is encoded as plain text.** Each sentinel is replaced by its text encoded with
   ``split_special_tokens=True``: a user typing ``<|im_end|>`` gets the bytes, never the special
   token. Added tokens that are not flagged special (some checkpoints ship ``<image>`` that way)
   and the family's vision placeholders are broken up too, so user text can never yield an image
   slot. Only the template's structural text is encoded with special tokens recognised.
3. **Images are expanded only by the processor.** Each image placeholder the template emits is
   encoded by calling the processor on that placeholder and that one image, so the number of
   vision tokens is what the vision encoder will produce, and per-image ``detail`` can differ.
4. **Labels** come from prefix renders: for an assistant turn *i*, ``template(messages[:i],
   add_generation_prompt=True)`` ends where its reply starts; the trained span runs from there up
   to and including the first end-of-turn token (``<|im_end|>``, ``<|eot_id|>``...). Turns with
   ``weight=0`` and everything else (system/user/tool text, headers, images) get ``-100``.

What differs between model families (placeholder, end-of-turn token, ``detail`` rule) comes from
:mod:`openft.models.families`; call sites are the same for every family.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
import torch
from PIL import Image

from openft.datasets.formats import ChatExample, ImagePart, Message, PreferenceExample, TextPart
from openft.datasets.images import DECODE_MAX_PIXELS, open_image
from openft.datasets.tokens import TokenCount
from openft.errors import InvalidRequest
from openft.models.families import (
    END_OF_TURN_TOKENS,
    LOW_DETAIL_MAX_PIXELS,
    Family,
    find_chat_format,
    find_family,
)
from openft.models.thinking import split_thinking, thinking_of

IGNORE_INDEX = -100

LOW_DETAIL_MAX_SIDE = 512
"""``detail="low"``: the image is first shrunk (aspect kept) to fit within 512x512 ..."""
# ... then the family's rule applies (``Family.detail_kwargs``; Qwen2-VL caps the pixel budget at
# ``min(LOW_DETAIL_MAX_PIXELS, max_pixels // 4)``).
TOKEN_ALIGNED_KEYS = frozenset({"mm_token_type_ids", "token_type_ids"})
"""Vision-side tensors with one entry per input id (the per-token modality ids a model takes under
``Family.token_types_key``): padded with the ids when batched, never concatenated over images."""
__all__ = [
    "IGNORE_INDEX",
    "TOKEN_ALIGNED_KEYS",
    "LOW_DETAIL_MAX_PIXELS",
    "Rendered",
    "cat_vision",
    "TokenCount",
    "count_tokens",
    "fold_system",
    "load_image",
    "render_chat",
]

# Templates that serialise tool-call arguments with ``tojson`` expect a mapping (the Hugging Face
# convention: Qwen2.5, Llama 3.1, Mistral); the others print the JSON string as it is.
_ARGUMENTS_AS_MAPPING = re.compile(r"arguments\s*\|\s*tojson|function\s*\|\s*tojson")


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # token id where trained, -100 elsewhere
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    """The processor's vision tensors (Qwen2-VL: ``pixel_values``, ``image_grid_thw``; LLaVA, Gemma 3:
    ``pixel_values``) and, for models that take them, the per-token modality ids (same length as
    ``input_ids``; Qwen2-VL: ``mm_token_type_ids``, Gemma 3: ``token_type_ids``, see
    :data:`TOKEN_ALIGNED_KEYS`) when the conversation has images; empty otherwise."""
    n_image_tokens: int = 0
    """Tokens that stand for vision features (as many as the vision encoder produces)."""
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    """Token ``[start, end)`` of each image's expansion (features plus any structure around them,
    such as Gemma 3's begin/end-of-image tokens): never cut by truncation."""

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


F = TypeVar("F", bound=Callable[..., Any])

_TOKENIZER_LOCK = threading.RLock()
"""Fast tokenizers keep ``split_special_tokens`` as state on the shared Rust tokenizer, so a
render encoding user text with it on flips it for another thread encoding template text, whose
special tokens then come out split (a wrong prompt). Serving renders from many threads at once;
each holds this lock for its few milliseconds."""


def _one_at_a_time(fn: F) -> F:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _TOKENIZER_LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]


@_one_at_a_time
def render_chat(
    processor: Any,
    messages: Sequence[Message],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
    enable_thinking: bool | None = None,
) -> Rendered:
    """Turn ``messages`` into ``Rendered`` token ids, labels and vision tensors.

    ``processor`` is a multimodal processor (with ``.tokenizer``) or a bare tokenizer for
    text-only models. ``max_length`` truncates a longer render from the end to that many tokens
    (before an image that would be cut); if no trained token is left, it raises ``InvalidRequest``
    (code ``no_trained_tokens_within_limit``).

    Image ``detail``: ``"low"`` shrinks the image to fit within 512x512, then the family's rule
    applies (Qwen2-VL: the pixel budget is capped at ``min(448*448, max_pixels // 4)``; LLaVA: no
    further change, every image has the same cost); ``"high"``/``"auto"`` use the processor's
    defaults.

    ``enable_thinking`` is passed to templates that read it (Qwen3: False ends the generation
    prompt with an empty ``<think>`` block); None leaves the template's default. An assistant
    message with a ``<think>`` block in its content is rendered as the model's own template
    renders it (see :mod:`openft.models.thinking`), and so is whitespace around message text
    that a template trims (Llama 3.1's ``| trim``), or a tool result it JSON-encodes (Llama 3.1's
    ``| tojson``); see :func:`_match_template_text`.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if template is None:
        raise InvalidRequest(
            "the base model has no chat template; pick an instruct/chat model", param="model"
        )
    chat_format = find_chat_format(tokenizer)
    if (
        chat_format is not None
        and chat_format.tool_format is None
        and getattr(find_family(processor), "tool_format", None) is None
        and any(m.tool_calls or m.role == "tool" for m in messages)
    ):
        raise InvalidRequest(
            f"the base model's chat format ({chat_format.name}) has no tool calls; use a base model "
            "whose chat template supports tools, or remove tool_calls and tool messages",
            param="messages",
            code="tool_calls_not_supported",
        )
    if chat_format is not None and not chat_format.system_role:
        messages = fold_system(messages)
    sent = _Sentinels(
        messages,
        tools,
        arguments_as_mapping=bool(_ARGUMENTS_AS_MAPPING.search(template)),
        # Multimodal templates iterate content parts (LLaVA-1.5's only knows lists); text-only
        # templates concatenate a string (Qwen2.5's ``+ message.content``, Llama 3.1's ``| trim``).
        parts=getattr(processor, "image_processor", None) is not None,
        # The template splits <think> blocks off assistant content itself, which it cannot do on
        # a placeholder: split them first, its way, and hand it ``reasoning_content``.
        reasoning=thinking_of(tokenizer) is not None,
    )
    conv = [sent.message(m) for m in messages]
    tools_t = sent.tools(tools)
    template_kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def apply(msgs: list[dict[str, Any]], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs,
                tools=tools_t,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=gen,
                **template_kwargs,
            )
        except jinja2.TemplateError as exc:  # raise_exception(): the template refuses this layout
            raise InvalidRequest(
                f"the base model's chat template cannot render this conversation: {exc}",
                param="messages",
                code="chat_template_refused",
            ) from exc

    _match_template_text(sent, conv, lambda msgs: apply(msgs, add_generation_prompt))
    full = apply(conv, add_generation_prompt)
    dropped = [n for n in sent.call_names if n not in full]
    if dropped:
        raise InvalidRequest(
            "the base model's chat template does not render tool calls (it dropped "
            f"{len(dropped)}); use a base model whose template supports tools, or remove tool_calls",
            param="messages",
            code="tool_calls_not_supported",
        )
    if tools_t and not any(marker in full for marker in sent.tool_markers):
        # The template ignores tool schemas (SmolVLM's, Idefics3's): the model would never see them.
        raise InvalidRequest(
            "the base model's chat template does not render tools, so the model would never see them; "
            "use a base model whose template supports tools, or remove tools",
            param="tools",
            code="tools_not_supported",
        )
    family = find_family(processor)
    if family is not None:
        eot = family.end_of_turn(tokenizer)
    elif chat_format is not None:
        eot = chat_format.end_of_turn
    else:
        eot = _end_of_turn(tokenizer)
    protected = _protected_ids(processor, tokenizer, family)

    # Character spans of the rendered string that are trained on (assistant reply + end-of-turn).
    # A reply starts where the generation prompt after the turns before it ends. Most templates
    # render those turns the same whatever follows (prefix-stable); some do not (Qwen3 drops the
    # empty <think> block of earlier turns; Mistral puts tools in the last user turn), so the
    # reply is then found by its own rendering, searched after the previous trained span.
    trained: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m.role != "assistant" or m.weight == 0:
            continue
        head = apply(conv[:i], True)
        if full.startswith(head) and len(head) >= cursor:
            start = len(head)
        else:
            upto = apply(conv[: i + 1], False)
            reply = upto[len(head) :] if upto.startswith(head) else ""
            if eot and eot in reply:
                reply = reply[: reply.index(eot) + len(eot)]
            start = full.find(reply, cursor) if reply.strip() else -1
            if start < 0:
                raise ValueError("cannot locate an assistant turn in the rendered chat template")
        stop = full.find(eot, start) if eot else -1
        end = stop + len(eot) if stop >= 0 else len(apply(conv[: i + 1], False))
        trained.append((start, end))
        cursor = end

    # Cut the string at sentinels and trained-span edges; encode each piece by its kind.
    cuts = {0, len(full)} | {p for span in trained for p in span}
    for m in sent.pattern.finditer(full):
        cuts |= {m.start(), m.end()}
    edges = sorted(cuts)
    images = iter(img for m in messages for img in m.images)
    ids: list[int] = []
    labels: list[int] = []
    image_spans: list[tuple[int, int]] = []  # token [start, end) of each image's placeholders
    per_image: list[dict[str, torch.Tensor]] = []
    for a, b in zip(edges, edges[1:], strict=False):
        piece = full[a:b]
        is_trained = any(s <= a and b <= e for s, e in trained)
        match = sent.pattern.fullmatch(piece)
        if match:  # user-controlled text: plain text, never special tokens
            new = _encode_text(tokenizer, sent.values[int(match.group(1))], protected)
        else:
            new = _encode_structure(
                processor, tokenizer, family, piece, images, image_spans, per_image, len(ids)
            )
        ids += new
        labels += new if is_trained else [IGNORE_INDEX] * len(new)

    if next(images, None) is not None:
        raise InvalidRequest(
            "the base model's chat template has no image placeholder; use a vision-language base model "
            "or remove the images",
            param="messages",
        )

    if max_length is not None and len(ids) > max_length:
        # OpenAI's rule for over-long examples: truncate from the end to the limit. Never inside an
        # image (its tokens must match the vision features), and never so far that nothing is
        # left to train on.
        cut = max_length
        for s_, e_ in image_spans:
            if s_ < cut < e_:
                cut = s_
        if not any(lab != IGNORE_INDEX for lab in labels[:cut]):
            raise InvalidRequest(
                f"example is {len(ids):,} tokens (images included) and truncating it to the length limit "
                f"of {max_length:,} leaves no assistant token to train on; shorten the conversation before "
                "the first trained reply, use fewer or low-detail images, or raise the limit "
                '(extra_body={"openft": {"max_length": N}})',
                param="messages",
                code="no_trained_tokens_within_limit",
            )
        ids, labels = ids[:cut], labels[:cut]
        kept = sum(1 for _, e in image_spans if e <= cut)
        image_spans, per_image = image_spans[:kept], per_image[:kept]

    # The span of an image may hold more than its features (Gemma 3: newlines, begin/end-of-image
    # tokens, pan-and-scan text): count the feature tokens themselves.
    feature = _feature_id(processor, tokenizer, family)
    n_image_tokens = sum(
        sum(1 for t in ids[s_:e_] if feature is None or t == feature) for s_, e_ in image_spans
    )

    vision: dict[str, torch.Tensor] = {}
    if per_image:
        for key in per_image[0]:
            vision[key] = cat_vision([v[key] for v in per_image])
        # Only for models that take them (Qwen2-VL's M-RoPE, Gemma 3's bidirectional image
        # attention): the processor says so. LLaVA's ``generate`` rejects the unknown keyword.
        if getattr(processor, "return_mm_token_type_ids", False):
            key = family.token_types_key if family else "mm_token_type_ids"
            vision[key] = torch.tensor(processor.create_mm_token_type_ids([ids])[0], dtype=torch.long)
    return Rendered(
        input_ids=ids, labels=labels, vision=vision, n_image_tokens=n_image_tokens, image_spans=image_spans
    )


def cat_vision(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (or per-example) vision tensors joined along dim 0, the images' order.

    Processors that split an image into a varying number of tiles (Idefics3 / SmolVLM:
    ``pixel_values`` ``[1, tiles, C, H, W]``, ``pixel_attention_mask`` ``[1, tiles, H, W]``) give
    shapes that differ after dim 0; those are zero-padded to the largest, which is how the
    processors pad a batch themselves (the model drops all-zero tiles). Equal shapes (Qwen2-VL's
    flat patches, LLaVA's fixed crops) are simply concatenated.
    """
    shape = tuple(max(v.shape[d] for v in values) for d in range(1, values[0].dim()))
    padded = []
    for v in values:
        if tuple(v.shape[1:]) != shape:
            grown = v.new_zeros((v.shape[0], *shape))
            grown[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
            v = grown
        padded.append(v)
    return torch.cat(padded, dim=0)


@_one_at_a_time
def count_tokens(
    processor: Any, example: ChatExample | PreferenceExample, *, max_length: int | None = None
) -> TokenCount:
    """Tokens (image tokens included) of ``example`` before truncation, tools included.

    A chat example counts its whole rendered conversation. A preference pair counts both
    sequences a DPO step runs: prompt + preferred and prompt + non-preferred. With
    ``max_length``, each sequence must also survive truncation to it with a trained token left
    (else ``InvalidRequest``, code ``no_trained_tokens_within_limit``), as training will need.
    """
    tools = example.tools
    if isinstance(example, ChatExample):
        sequences = [tuple(example.messages)]
    else:
        sequences = [(*example.prompt, reply) for reply in (example.preferred, example.non_preferred)]
    total = trained = 0
    for messages in sequences:
        r = render_chat(processor, messages, tools=tools)
        if max_length is not None and len(r.input_ids) > max_length:
            render_chat(processor, messages, tools=tools, max_length=max_length)
        total += len(r.input_ids)
        trained = max(trained, r.n_label_tokens)
    return TokenCount(total, trained)


def fold_system(messages: Sequence[Message]) -> tuple[Message, ...]:
    """For chat formats without a system turn (Gemma, Mistral): a leading system (or developer)
    message becomes the start of the first user turn, ``system + "\\n\\n" + user``, as
    Gemma 3's template does it. Images in the system message move along with its text."""
    if not messages or messages[0].role not in ("system", "developer"):
        return tuple(messages)
    system, rest = messages[0], list(messages[1:])
    for k, m in enumerate(rest):
        if m.role == "user":
            joined = (*system.content, TextPart("\n\n"), *m.content)
            rest[k] = Message(
                "user", joined, name=m.name, tool_call_id=m.tool_call_id, tool_calls=m.tool_calls
            )
            return tuple(rest)
    return (Message("user", system.content), *rest)


def load_image(part: ImagePart, *, max_pixels: int = DECODE_MAX_PIXELS) -> Image.Image:
    """Decode an image part's bytes to RGB, applying the ``detail="low"`` resize.

    The image shrinks on load to ``max_pixels`` (JPEG never decodes at full size), so a huge
    image costs memory for its budget, not for its size; the processor then resizes as usual.
    """
    if part.data is None:
        raise InvalidRequest("image has no decoded bytes; validate the file first", param="messages")
    if part.detail == "low":
        # At least the 512x512 box (aspect kept) survives the shrink for thumbnail() to work on.
        max_pixels = min(max_pixels, 4 * LOW_DETAIL_MAX_SIDE * LOW_DETAIL_MAX_SIDE)
    img = open_image(part.data, max_pixels=max_pixels)
    if img.mode != "RGB":
        rgb = img.convert("RGB")
        img.close()
        img = rgb
    if part.detail == "low":
        img.thumbnail((LOW_DETAIL_MAX_SIDE, LOW_DETAIL_MAX_SIDE))
    return img


# --- helpers ---------------------------------------------------------------------------------


def _pixel_budget(processor: Any, family: Family | None) -> int:
    """Pixels an image may keep on load: the decode budget, or the processor's own pixel cap
    (Qwen2-VL's ``max_pixels``) when that is larger, so the processor still decides the size."""
    cap = family.max_pixels(getattr(processor, "image_processor", None)) if family else None
    return max(DECODE_MAX_PIXELS, cap) if isinstance(cap, int) else DECODE_MAX_PIXELS


def _encode_text(tokenizer: Any, text: str, protected: dict[int, str] | None = None) -> list[int]:
    """User text as plain text: never a special token, an added token or a vision placeholder."""
    if not text:
        return []
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if not protected or protected.keys().isdisjoint(ids):
        return ids
    # ``split_special_tokens`` only splits tokens flagged special; an added token that is not (or a
    # pre-tokenizer that keeps it whole) still comes out as one id. Cut the text one character into
    # every occurrence of a protected string, so no piece contains one, and encode piece by piece.
    cuts = {0, len(text)}
    for s in set(protected.values()):
        start = text.find(s)
        while start >= 0:
            cuts.add(start + 1)
            start = text.find(s, start + 1)
    edges = sorted(cuts)
    ids = []
    for a, b in zip(edges, edges[1:], strict=False):
        ids += tokenizer(text[a:b], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if not protected.keys().isdisjoint(ids):  # a one-character protected token: nothing safe to do
        raise InvalidRequest(
            "the text contains a special token of this model; remove it or write it differently",
            param="messages",
        )
    return ids


def _protected_ids(processor: Any, tokenizer: Any, family: Family | None) -> dict[int, str]:
    """Token ids user text must never produce -> their strings: every added special token and the
    family's vision placeholders (special or not). Plain added tokens (Qwen's ``<tool_call>``,
    ``<think>``) stay encodable: assistant text may legitimately contain them."""
    out: dict[int, str] = {}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out[tid] = getattr(tok, "content", str(tok))
    names = list(family.placeholder_tokens) if family else []
    names += [getattr(processor, a, None) for a in ("image_token", "video_token")]
    vocab = tokenizer.get_vocab()
    for name in names:
        if name and name in vocab:
            out[vocab[name]] = name
    return out


def _encode_structure(
    processor: Any,
    tokenizer: Any,
    family: Family | None,
    text: str,
    images: Any,
    image_spans: list[tuple[int, int]],
    per_image: list[dict[str, torch.Tensor]],
    offset: int,
) -> list[int]:
    """Encode template text (special tokens recognised), expanding each image placeholder."""
    image_token = getattr(processor, "image_token", None) or (family.image_token if family else None)
    chunks = text.split(image_token) if image_token else [text]
    out: list[int] = []
    for k, chunk in enumerate(chunks):
        if k > 0:  # an image placeholder sat between chunk k-1 and chunk k
            part = next(images, None)
            if part is None:
                raise ValueError("the chat template emitted more image placeholders than there are images")
            enc = processor(
                text=[image_token],
                images=[load_image(part, max_pixels=_pixel_budget(processor, family))],
                add_special_tokens=False,
                return_tensors="pt",
                **(family.detail_kwargs(processor.image_processor, part.detail) if family else {}),
            )
            new = enc["input_ids"][0].tolist()
            image_spans.append((offset + len(out), offset + len(out) + len(new)))
            per_image.append(
                {
                    k2: v
                    for k2, v in enc.items()
                    if k2 not in ("input_ids", "attention_mask", *TOKEN_ALIGNED_KEYS)
                }
            )
            out += new
        if chunk:
            out += tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return out


_TEXT_KEYS = ("content", "reasoning_content")


def _match_template_text(
    sent: _Sentinels, conv: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str]
) -> None:
    """Transform message text the way the template transforms it.

    Templates see inert markers, not the text, so whatever they would do to the text itself is
    done to it here, found by rendering the conversation again with the markers slightly changed
    (only when some text would be affected; most conversations cost no extra render):

    - **Trimming.** Templates strip message content (Llama 3.1 and Gemma ``| trim`` every
      message, Mistral v0.3 assistant replies, Qwen3 ``lstrip('\\n')`` after a reasoning block),
      but markers have no whitespace to strip. Each marker of a text with whitespace at an edge is
      wrapped in ``"\\n"``, then in ``" "``: where the wrap disappears the template strips that
      edge of that message (both gone: all whitespace, as ``trim``; only the newline: newlines,
      as ``strip('\\n')``).
    - **JSON-encoding.** Llama 3.1 writes a tool result with ``| tojson`` (a string becomes a
      quoted, escaped JSON string). A ``"`` appended to the marker comes out as ``\\"`` there:
      the text is then JSON-escaped as ``tojson`` escapes it (the quotes around it are the
      template's).
    """
    trim = {k for k in sent.text_marks if sent.values[k] != sent.values[k].strip()}
    escape = {
        k for k in sent.text_marks if json.dumps(sent.values[k], ensure_ascii=False)[1:-1] != sent.values[k]
    }
    if not trim and not escape:
        return

    def probe(wrap: Callable[[str], str], marks: set[int]) -> str:
        wrapped = {sent.marker(k): wrap(sent.marker(k)) for k in marks}
        return render(
            [
                {
                    key: wrapped.get(v, v) if isinstance(v, str) and key in _TEXT_KEYS else v
                    for key, v in m.items()
                }
                for m in conv
            ]
        )

    if trim:
        base = sent.pattern.split(render(conv))
        kept = {
            ws: _kept_edges(base, sent.pattern.split(probe(lambda m, ws=ws: ws + m + ws, trim)), trim, ws)
            for ws in ("\n", " ")
        }
        for k in trim:
            text = sent.values[k]
            for edge, strip in (("lead", str.lstrip), ("trail", str.rstrip)):
                newline, space = kept["\n"].get((k, edge)), kept[" "].get((k, edge))
                if newline is False and space is False:
                    text = strip(text)
                elif newline is False and space is True:
                    text = strip(text, "\n")
                elif newline is True and space is False:
                    text = strip(text, " ")
            sent.values[k] = text
    if escape:
        quoted = probe(lambda m: m + '"', escape)
        for k in escape:
            if sent.marker(k) + '\\"' in quoted:
                sent.values[k] = json.dumps(sent.values[k], ensure_ascii=False)[1:-1]


def _kept_edges(
    base: list[str], probe: list[str], wanted: set[int], ws: str
) -> dict[tuple[int, str], bool | None]:
    """For each wrapped marker edge, whether the wrap survived in ``probe`` (None: cannot tell).

    ``base`` and ``probe`` are renders split at markers (``[text, index, text, index, ...]``);
    the template text between two markers must be the base's, plus the wraps that survived.
    """
    out: dict[tuple[int, str], bool | None] = {}
    if base[1::2] != probe[1::2]:  # the template renders a different layout: leave the text alone
        return out
    marks = [int(i) for i in base[1::2]]

    def record(key: tuple[int, str], value: bool | None) -> None:
        out[key] = value if out.get(key, value) == value else None

    for i, (text, seen) in enumerate(zip(base[0::2], probe[0::2], strict=True)):
        left = marks[i - 1] if i > 0 and marks[i - 1] in wanted else None
        right = marks[i] if i < len(marks) and marks[i] in wanted else None
        found = [
            (tail, head)
            for tail in ((False, True) if left is not None else (False,))
            for head in ((False, True) if right is not None else (False,))
            if (ws if tail else "") + text + (ws if head else "") == seen
        ]
        if len(found) == 1:
            tail, head = found[0]
        else:  # the other side changed too (a JSON-encoded neighbour): judge each side alone
            tail = _one_side(seen.startswith(ws + text), seen.startswith(text))
            head = _one_side(seen.endswith(text + ws), seen.endswith(text))
        if left is not None:
            record((left, "trail"), tail)
        if right is not None:
            record((right, "lead"), head)
    return out


def _one_side(with_wrap: bool, without: bool) -> bool | None:
    return with_wrap if with_wrap != without else None


def _feature_id(processor: Any, tokenizer: Any, family: Family | None) -> int | None:
    """The id of the per-feature vision token; None: every token of an image span is one."""
    token = family.feature_token if family else None
    if token is None:
        return None
    return tokenizer.convert_tokens_to_ids(token)


def _end_of_turn(tokenizer: Any) -> str | None:
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            return tok
    return tokenizer.eos_token


class _Sentinels:
    """Swaps user-controlled strings for inert ASCII markers, and remembers what they stood for."""

    def __init__(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] | None,
        *,
        arguments_as_mapping: bool = False,
        parts: bool = True,
        reasoning: bool = False,
    ) -> None:
        blob = json.dumps(tools or []) + "".join(m.text + json.dumps(m.tool_calls or []) for m in messages)
        nonce = 0
        while f"OPENFTSEG{nonce}N" in blob:
            nonce += 1
        self.pattern = re.compile(f"OPENFTSEG{nonce}N(\\d+)E")
        self._prefix = f"OPENFTSEG{nonce}N"
        self.values: list[str] = []
        self._arguments_as_mapping = arguments_as_mapping
        self._parts = parts
        self._reasoning = reasoning
        self.call_names: list[str] = []
        """The markers of tool-call names: each must appear in the render."""
        self.text_marks: list[int] = []
        """Indexes of the values that are message text handed to the template as a string
        (content, reasoning): the template may trim them."""
        self.tool_markers: list[str] = []
        """The markers of the tool schemas' strings: a template that renders tools shows some."""

    def _mark(self, replacement: str) -> str:
        self.values.append(replacement)
        return self.marker(len(self.values) - 1)

    def marker(self, index: int) -> str:
        return f"{self._prefix}{index}E"

    def _mark_text(self, text: str) -> str:
        """A string-content marker (empty text stays empty: templates test it for truth)."""
        if not text:
            return ""
        self.text_marks.append(len(self.values))
        return self._mark(text)

    def message(self, m: Message) -> dict[str, Any]:
        content: str | list[dict[str, Any]]
        reasoning: str | None = None
        if self._parts or m.images:
            content = [
                {"type": "text", "text": self._mark(p.text)} if isinstance(p, TextPart) else {"type": "image"}
                for p in m.content
            ]
            if not content and not m.tool_calls:
                # An empty reply (a weight-0 placeholder turn) as one empty text part: SmolVLM's and
                # Idefics3's templates read ``content[0]`` and fail on an empty list.
                content = [{"type": "text", "text": self._mark("")}]
        else:
            text = m.text
            if self._reasoning and m.role == "assistant":
                reasoning, text = split_thinking(text)
            content = self._mark_text(text)
        out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if reasoning is not None:
            out["reasoning_content"] = self._mark_text(reasoning)
        if m.tool_calls:
            out["tool_calls"] = [self._tool_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            out["name"] = m.name
        return out

    def _tool_call(self, call: dict[str, Any]) -> dict[str, Any]:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("name"), str):
            fn["name"] = self._mark(fn["name"])
            self.call_names.append(fn["name"])
        args = fn.get("arguments")
        if isinstance(args, str):
            parsed = _json_object(args) if self._arguments_as_mapping else None
            # A mapping's keys and string values become markers too: ``tojson`` then prints them
            # quoted, and each marker stands for its JSON-escaped text.
            fn["arguments"] = self._json_values(parsed, keys=True) if parsed is not None else self._mark(args)
        return {**call, "function": fn}

    def tools(self, tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if not tools:
            return None
        first = len(self.values)
        out = [self._json_values(t) for t in tools]
        self.tool_markers = [f"{self._prefix}{i}E" for i in range(first, len(self.values))]
        return out

    def _json_values(self, obj: Any, key: str | None = None, *, keys: bool = False) -> Any:
        # String values become markers whose replacement is their JSON-escaped form, as `tojson`
        # would print it; keys and `type` tags stay real so templates can still branch on them
        # (tool schemas), unless ``keys`` (tool-call arguments: no template looks inside).
        if isinstance(obj, dict):
            return {
                (self._escaped(k) if keys else k): self._json_values(v, k, keys=keys) for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [self._json_values(v, keys=keys) for v in obj]
        if isinstance(obj, str) and (keys or key != "type"):
            return self._escaped(obj)
        return obj

    def _escaped(self, text: str) -> str:
        return self._mark(json.dumps(text, ensure_ascii=False)[1:-1])


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
