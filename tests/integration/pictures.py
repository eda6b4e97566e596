"""The picture task through a served vision model (the vision-family e2e modules share it): fine-tune
on pictures, ask a picture's colour, score held-out pictures."""

from __future__ import annotations

import io

from openai import NOT_GIVEN, NotGiven, OpenAI
from openai.types.fine_tuning import FineTuningJob

from tests.integration.test_service_e2e import wait_for
from tests.tasks import picture_examples, picture_jsonl, picture_message

LORA_WITH_VISION = {"openft": {"training_type": "lora", "train_vision_tower": True}}
"""``extra_body`` of a LoRA job that adapts the vision tower too."""


def picture_job(
    c: OpenAI,
    model: str,
    *,
    examples: int,
    data_seed: int,
    hyperparameters: dict[str, int],
    seed: int | NotGiven = NOT_GIVEN,
    suffix: str | NotGiven = NOT_GIVEN,
    lora: bool = False,
) -> FineTuningJob:
    """A job fine-tuning ``model`` on ``examples`` pictures (``picture_examples(examples,
    seed=data_seed)``), full or LoRA with the vision tower, waited for until it ends."""
    data = picture_jsonl(picture_examples(examples, seed=data_seed))
    f = c.files.create(file=("pictures.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=model,
        seed=seed,
        suffix=suffix,
        hyperparameters=hyperparameters,
        extra_body=LORA_WITH_VISION if lora else None,
    )
    return wait_for(c, job.id)


def answer(c: OpenAI, model: str, png: bytes, detail: str = "auto") -> str:
    out = c.chat.completions.create(
        model=model, messages=[picture_message(png, detail=detail)], temperature=0, max_tokens=3
    )
    return (out.choices[0].message.content or "").strip()


def accuracy(c: OpenAI, model: str, pairs: list[tuple[bytes, str]]) -> float:
    return sum(answer(c, model, png) == colour for png, colour in pairs) / len(pairs)
