"""Synthetic training tasks with a learnable rule, generated in the test (no data downloads)."""

from __future__ import annotations

import json
import random

# keyword -> answer. The prompt hides the keyword among filler words; held-out prompts use
# filler arrangements never seen in training, so only the rule answers them.
COLOURS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "coal": "black",
    "snow": "white",
    "banana": "yellow",
}
FILLER = [
    "the",
    "a",
    "big",
    "small",
    "old",
    "new",
    "my",
    "your",
    "some",
    "this",
    "that",
    "one",
    "wet",
    "dry",
    "far",
]


def colour_prompt(rng: random.Random, keyword: str) -> str:
    words = rng.sample(FILLER, 3)
    words.insert(rng.randrange(4), keyword)
    return "Colour of " + " ".join(words) + "?"


def colour_examples(n: int, *, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    keys = list(COLOURS)
    return [(colour_prompt(rng, k), COLOURS[k]) for k in (keys[i % len(keys)] for i in range(n))]


def to_jsonl(pairs: list[tuple[str, str]], system: str | None = None) -> bytes:
    lines = []
    for prompt, answer in pairs:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()
