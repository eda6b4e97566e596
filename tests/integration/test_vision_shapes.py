"""The built-in model learns *shape* from pictures, not only colour: 3 colours x 2 shapes (chance
1/6), `detail: "low"`, every hyperparameter on auto, through the real service."""

from __future__ import annotations

import io
import json
import random

import pytest

from tests.integration.test_service_e2e import wait_for
from tests.tasks import picture_message, shape_picture

pytestmark = pytest.mark.slow

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square")
QUESTION = "What is in the picture?"


def pictures(n: int, *, seed: int) -> list[tuple[bytes, str]]:
    """112-pixel pictures cycling through the six classes, shape at a random place and size."""
    rng = random.Random(seed)
    return [
        (
            shape_picture(rng, COLOURS[i % 3], SHAPES[i // 3 % 2], size=112),
            f"{COLOURS[i % 3]} {SHAPES[i // 3 % 2]}",
        )
        for i in range(n)
    ]


def test_colour_and_shape_are_learned_with_auto_hyperparameters(full_server):
    c = full_server.client("shapes")
    lines = [
        json.dumps(
            {"messages": [picture_message(png, QUESTION, detail="low"), {"role": "assistant", "content": a}]}
        )
        for png, a in pictures(240, seed=1)
    ]
    f = c.files.create(
        file=("shapes.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", seed=7)
    job = wait_for(c, job.id, timeout=3600)
    assert job.status == "succeeded", job.error
    # the random-init rule for images: batches of 8, 20 epochs (4,800 example-passes)
    assert (job.hyperparameters.batch_size, job.hyperparameters.n_epochs) == (8, 20)

    held_out = pictures(60, seed=99)  # pictures never trained on
    answers = [
        c.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[picture_message(png, QUESTION, detail="low")],
            temperature=0,
            max_tokens=4,
        )
        .choices[0]
        .message.content.strip()
        for png, _ in held_out
    ]
    right = sum(a == want for a, (_, want) in zip(answers, held_out, strict=True))
    shape_right = sum(
        a.split()[-1:] == [want.split()[1]] for a, (_, want) in zip(answers, held_out, strict=True)
    )
    print(f"held out: {right}/{len(held_out)} right, shape {shape_right}/{len(held_out)}")
    assert right / len(held_out) >= 0.8, list(zip(answers, [w for _, w in held_out], strict=True))
    assert shape_right / len(held_out) >= 0.8  # shape itself, well above chance (0.5)
