"""Validation options that know the target model: its token counts, context and control tokens.

Used by the worker's ``validating_files`` stage and by ``openft validate --model`` so both
report the same numbers that training will use.
"""

from __future__ import annotations

import functools
from typing import Any

from openft.datasets.validate import ValidationOptions
from openft.models.render import count_tokens

# transformers uses a huge sentinel (int(1e30)) when a tokenizer has no known context length.
_NO_LIMIT = 10**9


def model_validation_options(processor: Any, **overrides: Any) -> ValidationOptions:
    tokenizer = getattr(processor, "tokenizer", processor)
    max_len = getattr(tokenizer, "model_max_length", None)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if t not in specials]
    return ValidationOptions(
        token_counter=functools.partial(count_tokens, processor),
        max_tokens=max_len if isinstance(max_len, int) and max_len < _NO_LIMIT else None,
        control_tokens=(specials + extra) or None,
        **overrides,
    )
