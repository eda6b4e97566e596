"""Vision fine-tuning through the SDK: images in the training file, a person photo skipped and
reported, and chat with images on base, fine-tuned and checkpoint models."""

from __future__ import annotations

import io
import json

import pytest

from tests.integration.pictures import picture_job
from tests.integration.test_service_e2e import wait_for
from tests.tasks import (
    SHAPE_COLOURS,
    data_url,
    person_photo,
    picture_examples,
    picture_jsonl,
    picture_message,
)

pytestmark = pytest.mark.slow


def answer(c, model, png):
    out = c.chat.completions.create(model=model, messages=[picture_message(png)], temperature=0, max_tokens=3)
    return out.choices[0].message.content.strip()


@pytest.fixture(scope="module")
def vision_job(full_server):
    c = full_server.client("vision")
    train = picture_examples(180, seed=21)
    body = picture_jsonl(train).decode().splitlines()
    person = {"messages": [picture_message(person_photo()), {"role": "assistant", "content": "red"}]}
    body.insert(7, json.dumps(person))  # line 8 of the file
    f = c.files.create(
        file=("pictures.jsonl", io.BytesIO(("\n".join(body) + "\n").encode())), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model="openft-tiny-vlm",
        suffix="vision",
        seed=3,  # reproducible; over seeds 1-7 held-out accuracy was 0.85-0.92
        hyperparameters={"n_epochs": 6, "batch_size": 8},
    )
    return c, wait_for(c, job.id)


def test_person_photo_is_skipped_reported_and_the_job_succeeds(vision_job):
    c, job = vision_job
    assert job.status == "succeeded", job.error
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=200))
    skips = [e for e in events if e.level == "warn" and e.data and e.data.get("line") == 8]
    assert skips and skips[0].data["code"] in ("contains_people", "contains_faces")
    summary = next(e for e in events if e.message.startswith("Validated training_file"))
    assert "181 examples, 180 usable" in summary.message and "1 skipped" in summary.message
    # image tokens included, validation and training count the same tokens (6 epochs)
    assert summary.data["summary"]["images"] == 181  # every image in the file, the skipped one too
    assert job.trained_tokens == 6 * summary.data["summary"]["tokens"]["total"]


def test_fine_tuned_model_reads_pictures_it_never_saw(vision_job):
    c, job = vision_job
    held_out = picture_examples(60, seed=4242)
    tuned = sum(answer(c, job.fine_tuned_model, png) == colour for png, colour in held_out) / len(held_out)
    base = sum(answer(c, "openft-tiny-vlm", png) == colour for png, colour in held_out) / len(held_out)
    assert base <= 1 / len(SHAPE_COLOURS)
    assert tuned >= 0.8, f"held-out accuracy {tuned:.2f}"


def test_checkpoints_and_detail_low_serve_images(vision_job):
    c, job = vision_job
    ckpt = c.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    png, _ = picture_examples(1, seed=5)[0]
    for model in (ckpt, "openft-tiny-vlm"):
        out = c.chat.completions.create(
            model=model, messages=[picture_message(png, detail="low")], max_tokens=2
        )
        assert out.usage.prompt_tokens > 0
    # more pixels at detail "high" than "low" for a large picture: more prompt tokens
    big = picture_examples(1, seed=6)[0][0]
    from PIL import Image

    large = io.BytesIO()
    Image.open(io.BytesIO(big)).resize((448, 448)).save(large, format="PNG")

    def msgs(d):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(large.getvalue()), "detail": d}}
                ],
            }
        ]

    low = c.chat.completions.create(
        model=job.fine_tuned_model, messages=msgs("low"), max_tokens=1
    ).usage.prompt_tokens
    high = c.chat.completions.create(
        model=job.fine_tuned_model, messages=msgs("high"), max_tokens=1
    ).usage.prompt_tokens
    assert high > low


def test_vision_lora_is_served_and_kept_by_merged_export(full_server, tmp_path):
    """LoRA on the vision tower (which e.g. vLLM ignores) is used by openft's own serving, and
    `openft export --merged` folds it in: the export, served as a plain base model, answers
    image prompts exactly as the adapter does."""
    from tests.conftest import start_server

    c = full_server.client("vision-lora")
    job = picture_job(
        c, "openft-tiny-vlm", examples=24, data_seed=41, hyperparameters={"n_epochs": 1}, lora=True
    )
    assert job.status == "succeeded", job.error

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert full_server.cli("export", job.fine_tuned_model, "--to", str(adapter)).returncode == 0
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        vision_lora = [k for k in weights.keys() if "visual" in k and "lora_" in k]
    assert vision_lora  # the vision tower really has LoRA weights
    out = full_server.cli("export", job.fine_tuned_model, "--to", str(merged), "--merged")
    assert out.returncode == 0, out.stderr

    pictures = [png for png, _ in picture_examples(4, seed=43)]
    served = [
        c.chat.completions.create(
            model=job.fine_tuned_model, messages=[picture_message(p)], temperature=0, max_tokens=6
        )
        for p in pictures
    ]
    other = start_server(
        tmp_path / "home2", "--no-worker", env={"OPENFT_BASE_MODELS": json.dumps([str(merged)])}
    )
    try:
        c2 = other.client("plain")
        plain = [
            c2.chat.completions.create(
                # A catalog list entry that is a folder is named by the folder's name.
                model=merged.name, messages=[picture_message(p)], temperature=0, max_tokens=6
            )
            for p in pictures
        ]
    finally:
        other.stop()
    assert [r.choices[0].message.content for r in plain] == [r.choices[0].message.content for r in served]
    assert [r.usage.prompt_tokens for r in plain] == [r.usage.prompt_tokens for r in served]
