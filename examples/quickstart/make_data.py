"""Regenerates this folder's train.jsonl, validation.jsonl and heldout.jsonl (deterministic).

The task: name the colour of a thing mentioned among other words. The three files use
different word arrangements, so a right answer on heldout.jsonl means the rule was learned,
not a sentence remembered.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "coal": "black",
    "snow": "white",
    "banana": "yellow",
    "carrot": "orange",
    "plum": "purple",
}
WORDS = "big small old new wet dry shiny dull round long fresh cold warm tiny huge soft".split()
TEMPLATES = (
    "What colour is the {a} {b} {thing}?",
    "Colour of my {a} {b} {thing}?",
    "Tell me the colour of a {a} {b} {thing}.",
    "A {a} {thing}, {b} too: what colour?",
)
SYSTEM = "Answer with one colour word."


def examples(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    things = list(COLOURS)
    out = []
    while len(out) < n:
        thing = things[len(out) % len(things)]
        a, b = rng.sample(WORDS, 2)
        prompt = rng.choice(TEMPLATES).format(a=a, b=b, thing=thing)
        if prompt in seen:
            continue
        seen.add(prompt)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": COLOURS[thing]},
        ]
        out.append({"messages": messages})
    return out


def main() -> None:
    here = Path(__file__).parent
    rng, seen = random.Random(7), set()
    for name, n in (("train", 240), ("validation", 40), ("heldout", 16)):
        lines = [json.dumps(e) for e in examples(n, rng, seen)]
        (here / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
