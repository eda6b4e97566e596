"""The render pre-pass on a pool of processes: the serial results, in order, with the same errors;
pixels stored in the run's autocast dtype change nothing the model computes."""

from __future__ import annotations

import functools
import io
import multiprocessing
import random
import threading

import pytest
import torch
from PIL import Image

from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
from openft.errors import InvalidRequest
from openft.models.loader import load_model, resolve_base
from openft.models.render import Rendered
from openft.training.collate import collate_sft
from openft.training.prerender import MIN_EXAMPLES_PER_WORKER, render_all, render_workers
from openft.training.recipes.sft import _render
from tests.unit.models.tiny_llava import build_tiny_llava


def _png(rng: random.Random, size: int) -> bytes:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((rng.randrange(size), rng.randrange(size)), (rng.randrange(256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _examples(n: int, seed: int = 0) -> list[ChatExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts: tuple = (TextPart(f"what is shown in picture {i}?"),)
        if i % 3:  # text-only examples in between
            parts = (ImagePart(url="data:", data=_png(rng, rng.choice([56, 84, 112]))), *parts)
        out.append(
            ChatExample(
                line=i + 1,
                messages=(Message("user", parts), Message("assistant", (TextPart(f"answer {i}"),), weight=1)),
            )
        )
    return out


def _same(a: list[Rendered], b: list[Rendered]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.input_ids, x.labels, x.n_image_tokens, x.image_spans) == (
            y.input_ids,
            y.labels,
            y.n_image_tokens,
            y.image_spans,
        )
        assert sorted(x.vision) == sorted(y.vision)
        for key in x.vision:
            assert x.vision[key].dtype == y.vision[key].dtype and torch.equal(x.vision[key], y.vision[key])


def test_a_pool_renders_what_the_serial_loop_renders_in_order(processor) -> None:
    examples = _examples(13)
    fn = functools.partial(_render, processor, max_length=512)
    serial = [fn(ex) for ex in examples]
    assert any(r.vision for r in serial) and any(not r.vision for r in serial)
    _same(render_all(fn, examples, workers=1), serial)
    _same(render_all(fn, examples, workers=3), serial)


def test_a_failing_example_gives_the_serial_error_for_the_first_one_in_file_order(processor) -> None:
    examples = _examples(12)
    long = Message("user", (TextPart("filler " * 400),))
    for i in (6, 10):  # lines 7 and 11: nothing left to train on after truncation to 64 tokens
        examples[i] = ChatExample(line=i + 1, messages=(long, examples[i].messages[1]))
    fn = functools.partial(_render, processor, max_length=64, what="validation file ")
    errors = []
    for workers in (1, 2):
        with pytest.raises(InvalidRequest) as caught:
            render_all(fn, examples, workers=workers)
        errors.append((caught.value.message, caught.value.param, caught.value.code))
    assert errors[0] == errors[1]
    assert errors[0][0].startswith("validation file line 7: example is ")


def test_auto_worker_count_is_bounded_by_cores_and_examples(monkeypatch) -> None:
    monkeypatch.setattr("openft.training.prerender.available_cores", lambda: 8)
    assert render_workers(None, 10) == 1  # too few examples to pay for a fork
    assert render_workers(None, 3 * MIN_EXAMPLES_PER_WORKER) == 3
    assert render_workers(None, 100_000) == 7  # one core left to the process receiving results
    assert render_workers(1, 100_000) == 1 and render_workers(4, 10) == 4
    monkeypatch.setattr("openft.training.prerender.available_cores", lambda: 2)
    assert render_workers(None, 100_000) == 1  # 2 cores: serial (see bench/README.md)


def test_pixels_are_stored_in_the_asked_dtype_at_half_the_bytes(processor) -> None:
    examples = _examples(6)
    fn = functools.partial(_render, processor, max_length=512)
    full = render_all(fn, examples, workers=1)
    half = render_all(fn, examples, workers=2, pixel_dtype=torch.bfloat16)
    for f, h in zip(full, half, strict=True):
        if not f.vision:
            continue
        assert f.vision["pixel_values"].dtype == torch.float32
        assert h.vision["pixel_values"].dtype == torch.bfloat16
        assert h.vision["pixel_values"].nbytes * 2 == f.vision["pixel_values"].nbytes
        assert torch.equal(h.vision["image_grid_thw"], f.vision["image_grid_thw"])  # integers untouched
        assert torch.equal(h.vision["pixel_values"], f.vision["pixel_values"].to(torch.bfloat16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    base = resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("tiny-cache"))
    return load_model(base, device="cpu")


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")), device="cpu")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_bf16_pixels_give_the_same_logits_under_bf16_autocast(family, tiny, llava) -> None:
    """Why storing bf16 pixels is lossless for a bf16 run: the vision tower's first use of them is
    its patch convolution, which autocast runs in bf16 on pixels it rounds to bf16 anyway."""
    model, processor = tiny if family == "qwen2_vl" else llava
    examples = [ex for ex in _examples(6) if len(ex.messages[0].content) == 2]
    fn = functools.partial(_render, processor, max_length=512)
    pad = processor.tokenizer.pad_token_id or 0
    full = collate_sft(render_all(fn, examples, workers=1), pad)
    half = collate_sft(render_all(fn, examples, workers=1, pixel_dtype=torch.bfloat16), pad)
    assert half["pixel_values"].dtype == torch.bfloat16
    logits = []
    for batch in (full, half):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits.append(model(**inputs, use_cache=False).logits)
    assert logits[0].dtype == torch.bfloat16
    assert torch.equal(logits[0], logits[1])
    # ...whereas without autocast (an fp32 run) the rounding would show: hence fp32 is kept there.
    with torch.no_grad():
        a = model(**{k: v for k, v in full.items() if k != "labels"}, use_cache=False).logits
        b = model(
            **{k: (v.float() if k == "pixel_values" else v) for k, v in half.items() if k != "labels"},
            use_cache=False,
        ).logits
    assert not torch.equal(a, b)


def _fail_at_41(i: int) -> torch.Tensor:
    if i == 40:
        raise InvalidRequest("line 41: no assistant message", param="training_file", code="bad_line")
    return torch.zeros(4 << 20)  # 16 MiB: the workers are busy writing results when line 41 fails


def test_a_failure_with_large_results_in_flight_raises_and_leaves_no_worker() -> None:
    # Terminating the pool on the error had hung a CI run (and hangs this test's shape on the
    # first try): a worker blocked writing a large result holds the result pipe's lock, which
    # Pool.terminate waits for after it has stopped reading results. The thread only turns
    # such a hang into a failure; a pass takes seconds.
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            render_all(_fail_at_41, list(range(200)), workers=2)
        except InvalidRequest as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=600)
    assert not thread.is_alive(), "render_all hung after a failing example"
    assert [e.message for e in outcome] == ["line 41: no assistant message"]
    assert multiprocessing.active_children() == []
    assert render_all(_fail_at_41, [1, 2, 3], workers=2)[2].shape == (4 << 20,)  # a new pool works
