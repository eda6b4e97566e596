"""SmolVLM2 (Idefics3 family) through the real stack: ``openft serve`` + the openai SDK.

A tiny random SmolVLM2 (``tests/unit/models/tiny_smolvlm.py``: the real architecture, processor
and chat template, no torchvision) is served from a model folder named in the catalog
(``OPENFT_BASE_MODELS``). It is fine-tuned on the picture task (the colour of a shape) and is right
on held-out pictures where its base is at chance; a LoRA fine-tune of it chats with images through
the continuous batcher; ``detail: "low"`` costs one tile where ``"high"`` splits a large picture
into tiles plus a global image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.conftest import Server, catalog_server
from tests.integration.pictures import accuracy, answer, picture_job
from tests.tasks import SHAPE_COLOURS, data_url, picture_examples, picture_message
from tests.unit.models.tiny_smolvlm import TOKENS_PER_TILE, build_tiny_smolvlm

pytestmark = pytest.mark.slow

MODEL = "tiny-smolvlm"
SEED = 3


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = build_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "tiny-smolvlm")
    with catalog_server(tmp_path_factory, {MODEL: folder}) as server:
        yield server


@pytest.fixture(scope="module")
def tuned(smol_server: Server):
    c = smol_server.client("smol")
    hyperparameters = {"n_epochs": 8, "batch_size": 8}
    job = picture_job(
        c, MODEL, examples=180, data_seed=21, seed=SEED, suffix="smol", hyperparameters=hyperparameters
    )
    return c, job


def test_fine_tuned_smolvlm_reads_pictures_it_never_saw(tuned) -> None:
    c, job = tuned
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{MODEL}:smol:smol:")
    held_out = picture_examples(60, seed=4242)
    base = accuracy(c, MODEL, held_out)
    tuned_acc = accuracy(c, job.fine_tuned_model, held_out)
    assert base <= 1 / len(SHAPE_COLOURS), base
    assert tuned_acc >= 0.9, f"held-out accuracy {tuned_acc:.2f}"


def test_detail_low_is_one_tile_and_high_splits_a_large_picture(tuned) -> None:
    c, job = tuned
    big = Image.open(io.BytesIO(picture_examples(1, seed=6)[0][0])).resize((448, 448))
    buf = io.BytesIO()
    big.save(buf, format="PNG")

    def prompt_tokens(detail: str) -> int:
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(buf.getvalue()), "detail": detail}}
                ],
            }
        ]
        out = c.chat.completions.create(model=job.fine_tuned_model, messages=msgs, max_tokens=1)
        return out.usage.prompt_tokens

    low, high, auto = prompt_tokens("low"), prompt_tokens("high"), prompt_tokens("auto")
    # low: one global tile; high (= auto, the processor's splitting): 2x2 tiles + the global one,
    # each tile TOKENS_PER_TILE image tokens plus its markers.
    assert high == auto
    assert high - low >= 4 * TOKENS_PER_TILE


def test_lora_fine_tune_chats_with_images_through_the_batcher(smol_server: Server, tuned) -> None:
    """A LoRA adapter (vision tower included) served next to the base and the full fine-tune:
    concurrent image requests to the three share the batcher; each answers as it does alone."""
    from concurrent.futures import ThreadPoolExecutor

    c, full_job = tuned
    job = picture_job(c, MODEL, examples=24, data_seed=41, hyperparameters={"n_epochs": 1}, lora=True)
    assert job.status == "succeeded", job.error
    models = [MODEL, job.fine_tuned_model, full_job.fine_tuned_model]
    pictures = [png for png, _ in picture_examples(4, seed=43)]
    alone = {(m, i): answer(c, m, p) for m in models for i, p in enumerate(pictures)}
    with ThreadPoolExecutor(max_workers=len(alone)) as pool:
        futures = {key: pool.submit(answer, c, key[0], pictures[key[1]]) for key in alone}
        together = {key: fut.result() for key, fut in futures.items()}
    assert together == alone
    assert all(isinstance(v, str) for v in alone.values())


def test_tools_are_refused_not_ignored(smol_server: Server) -> None:
    """SmolVLM's chat template has no tools: a request with tools gets a 400 naming ``tools``."""
    import openai

    c = smol_server.client("smol-tools")
    png, _ = picture_examples(1, seed=7)[0]
    tool = {"type": "function", "function": {"name": "get_colour", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[picture_message(png)], tools=[tool], max_tokens=2)
    assert (e.value.param, e.value.code) == ("tools", "tools_not_supported")
