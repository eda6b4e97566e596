"""Validation options that know the target model: its token counts, length limit and control tokens.

Used by the worker's ``validating_files`` stage and by ``openft validate --model`` so both
report the same numbers, and apply the same length limit, that training will use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from openft.datasets.validate import ValidationOptions
from openft.models.families import find_family
from openft.models.render import count_tokens

# transformers uses a huge sentinel (int(1e30)) when a tokenizer has no known context length.
_NO_LIMIT = 10**9
DEFAULT_MAX_LENGTH = 2048
"""The limit when neither the job, the catalog nor the model says one."""


@dataclass(frozen=True)
class LengthLimit:
    """The one length limit of a job: validation warns and training truncates at the same value."""

    tokens: int
    source: str
    """Where it came from: ``"job"`` (``openft.max_length``), ``"catalog"`` (the catalog entry's
    ``max_length``), ``"model"`` (the model's context length) or ``"default"``."""

    def describe(self) -> str:
        where = {
            "job": "set on the job",
            "catalog": "the model catalog's max_length",
            "model": "the model's context length",
            "default": "openft's default; the model states no context length",
        }[self.source]
        return f"{self.tokens:,} tokens ({where})"


def context_length(processor: Any, config: Any | None = None) -> int | None:
    """The model's context length: its config's ``max_position_embeddings`` (the text config's for
    a vision-language model), else the tokenizer's ``model_max_length``; None if neither says."""
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and 0 < n < _NO_LIMIT:
            return n
    tokenizer = getattr(processor, "tokenizer", processor)
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < _NO_LIMIT else None


def length_limit(
    processor: Any, config: Any | None = None, *, job: int | None = None, catalog: int | None = None
) -> LengthLimit:
    """The job's ``max_length`` if set, else the catalog entry's, else the model's context length."""
    if job is not None:
        return LengthLimit(job, "job")
    if catalog is not None:
        return LengthLimit(catalog, "catalog")
    n = context_length(processor, config)
    return LengthLimit(n, "model") if n is not None else LengthLimit(DEFAULT_MAX_LENGTH, "default")


def model_validation_options(
    processor: Any, *, max_length: int | None = None, **overrides: Any
) -> ValidationOptions:
    """``max_length``: the job's length limit (:func:`length_limit`); default: the model's context."""
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = max_length if max_length is not None else context_length(processor)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if t not in specials]
    # The family's vision-structure tokens too, special or not (SmolVLM's <row_1_col_1>, <global-img>
    # are plain added tokens to transformers): user text that contains one is flagged.
    family = find_family(processor)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    extra += [
        t for t in (family.placeholder_tokens if family else ()) if t in vocab and t not in specials + extra
    ]
    return ValidationOptions(
        token_counter=functools.partial(count_tokens, processor, max_length=limit),
        max_tokens=limit,
        control_tokens=(specials + extra) or None,
        **overrides,
    )
