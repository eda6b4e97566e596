"""Token accounting for the report.

The real counter comes from the model's processor (chat template + image tokens) and is
passed in by the caller; this module never imports a tokenizer. Without one, a rough
estimate is used instead (about 4 characters per token, images after OpenAI's published
``detail`` rule), and the report says which one it used.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import NamedTuple

from PIL import Image

from openft.datasets.formats import ChatExample, Example, ImagePart, Message
from openft.datasets.report import TokenSummary


class TokenCount(NamedTuple):
    """What a model's counter (``models.render.count_tokens``) finds in one example."""

    total: int
    """All tokens, image tokens included, of every sequence the example trains (a DPO pair: two)."""
    trained: int
    """The most trained (labelled) tokens in any one of those sequences: the rows of logits a loss
    over labelled positions holds for it (:func:`openft.training.memory.logits_rows`)."""


TokenCounter = Callable[[Example], "int | TokenCount"]
"""A model's counter: the total, or a :class:`TokenCount` when it also knows the trained tokens."""

_PER_MESSAGE = 4  # role markers and separators, roughly what chat templates add


def image_tokens(width: int, height: int, detail: str) -> int:
    """OpenAI's vision cost rule: 85 for low; else 85 + 170 per 512-px tile after resizing."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def _image_estimate(image: ImagePart) -> int:
    if image.data is None:
        return 85
    try:
        with Image.open(io.BytesIO(image.data)) as im:  # header only
            return image_tokens(im.width, im.height, image.detail)
    except Exception:
        return 85


def _message_estimate(message: Message) -> int:
    text = message.text
    if message.tool_calls:
        text += "".join(str(call) for call in message.tool_calls)
    return _PER_MESSAGE + math.ceil(len(text) / 4) + sum(_image_estimate(i) for i in message.images)


def estimate_tokens(example: Example) -> int:
    """A model-free estimate: ~4 characters per token plus OpenAI-style image tokens. Tool
    definitions count too: chat templates print them (often the longest part of an example)."""
    if isinstance(example, ChatExample):
        messages = example.messages
    else:
        messages = (*example.prompt, example.preferred, example.non_preferred)
    tools = math.ceil(len(json.dumps(example.tools, ensure_ascii=False)) / 4) if example.tools else 0
    return tools + sum(_message_estimate(m) for m in messages)


class TokenStats:
    """Collects one token count per usable example; summarises them for the report."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: list[int] = []  # one small int per example: fine even at 50k examples
        self.trained_max: int | None = None  # None until a counter says (estimates do not)

    def add(self, n: int, trained: int | None = None) -> None:
        self.counts.append(n)
        if trained is not None:
            self.trained_max = max(self.trained_max or 0, trained)

    def summary(self, max_tokens: int | None) -> TokenSummary:
        """Totals and distribution; ``trained_tokens_per_epoch`` caps each example at the context."""
        counts = sorted(self.counts)
        if not counts:
            return TokenSummary(self.source, None, None, None, None, None, None, trained_tokens_per_epoch=0)
        capped = sum(min(c, max_tokens) for c in counts) if max_tokens else sum(counts)
        return TokenSummary(
            source=self.source,
            total=sum(counts),
            min=counts[0],
            mean=round(sum(counts) / len(counts), 1),
            max=counts[-1],
            p50=_percentile(counts, 50),
            p95=_percentile(counts, 95),
            trained_tokens_per_epoch=capped,
            trained_max=self.trained_max,
        )


def _percentile(sorted_counts: list[int], p: float) -> int:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(p / 100 * len(sorted_counts)))
    return sorted_counts[rank - 1]
