"""Continuous batching: what a request gets does not depend on what else shares the batch.

Every comparison is exact (greedy answers token for token, sampled answers for the same seed):
a padding, position or cache bug in the batch shows up as a different answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from openft.adapters import merge
from openft.inference.chat import create_completion, stream_completion
from openft.inference.engine import Prompt, SamplingParams, TextDelta, generate
from openft.inference.registry import LoadedModel, ModelRef, Registry
from openft.models.loader import load_model
from openft.protocol.chat import ChatCompletionRequest

LOOSE = (
    "hello there",
    "what colour is the sky on a clear day? answer in one word please",
    "a",
    "count: one two three four five six seven eight nine ten eleven twelve",
)


def ask(loaded: LoadedModel, image_loader, text: str, *, image: str | None = None, **kw) -> dict:
    content: object = text
    if image is not None:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], "logprobs": True, **kw}
    )
    out = create_completion(loaded, request, image_loader=image_loader).model_dump()
    # Tokens and text must match exactly; log probabilities only to float rounding (a batched
    # matmul sums in another order), so they are compared as tokens, not values.
    return {
        "choices": [
            {
                "text": c["message"]["content"],
                "finish": c["finish_reason"],
                "tokens": [lp["token"] for lp in c["logprobs"]["content"]],
            }
            for c in out["choices"]
        ],
        "usage": out["usage"],
    }


def concurrently(calls: list[Callable[[], dict]]) -> list[dict]:
    results: list[dict | BaseException] = [RuntimeError("not run")] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def test_batched_greedy_equals_alone_for_mixed_prompts_lengths_and_images(loaded, image_loader, png_url):
    cases = [
        {"text": LOOSE[0], "max_tokens": 24},
        {"text": LOOSE[1], "max_tokens": 5},
        {"text": LOOSE[2], "max_tokens": 40, "n": 3},
        {"text": LOOSE[3], "max_tokens": 16, "image": png_url((112, 112), (200, 10, 10))},
        {"text": LOOSE[0], "max_tokens": 16, "image": png_url((56, 168), (10, 10, 200))},
        {"text": LOOSE[1], "max_tokens": 30, "image": png_url((224, 112), (10, 200, 10)), "n": 2},
    ]

    def call(case: dict) -> Callable[[], dict]:
        kw = {k: v for k, v in case.items() if k not in ("text",)}
        return lambda: ask(loaded, image_loader, case["text"], temperature=0, **kw)

    alone = [call(c)() for c in cases]
    peak_before = loaded.batcher.peak_rows
    together = concurrently([call(c) for c in cases])
    assert together == alone
    assert loaded.batcher.peak_rows > 1 or peak_before > 1  # they really shared a batch


def test_sampling_with_a_seed_and_stop_strings_is_per_request(loaded, image_loader):
    cases = [
        {"temperature": 1.0, "seed": 7, "max_tokens": 20},
        {"temperature": 0.8, "seed": 8, "top_p": 0.9, "max_tokens": 20, "stop": ["e"]},
        {"temperature": 1.2, "seed": 9, "max_tokens": 20, "n": 2, "presence_penalty": 1.0},
        {"temperature": 0, "max_tokens": 20, "stop": ["o", "a"]},
    ]
    calls = [lambda c=c, t=t: ask(loaded, image_loader, t, **c) for c, t in zip(cases, LOOSE, strict=True)]
    alone = [c() for c in calls]
    assert concurrently(calls) == alone
    stopped = alone[3]["choices"][0]
    assert "o" not in stopped["text"] and "a" not in stopped["text"]


def test_a_request_joins_mid_batch_and_another_leaves_early(loaded):
    tok = loaded.tokenizer
    long_ids, short_ids = tok(LOOSE[3])["input_ids"], tok(LOOSE[1])["input_ids"]

    def tokens(ids: list[int], n: int, on_first: Callable[[], None] | None = None) -> list[int]:
        out: list[int] = []
        for ev in generate(
            loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)
        ):
            out += [lp.token_id for lp in ev.logprobs]
            if on_first is not None and out:
                on_first()
                on_first = None
        return out

    long_alone, short_alone = tokens(long_ids, 60), tokens(short_ids, 3)
    joined = threading.Event()
    short_done = threading.Event()
    long_tokens_when_short_done: list[int] = []
    got: dict[str, list[int]] = {}

    def long_request() -> None:
        out: list[int] = []
        for ev in generate(
            loaded,
            Prompt(input_ids=long_ids),
            SamplingParams(max_new_tokens=60, temperature=0, logprobs=True),
        ):
            out += [lp.token_id for lp in ev.logprobs]
            if len(out) >= 5:
                joined.set()  # the long one is mid-way: now the short one joins
            if short_done.is_set() and not long_tokens_when_short_done:
                long_tokens_when_short_done.append(len(out))
        got["long"] = out

    t = threading.Thread(target=long_request)
    t.start()
    assert joined.wait(60)
    got["short"] = tokens(short_ids, 3)
    short_done.set()
    t.join(120)
    assert got["short"] == short_alone and got["long"] == long_alone
    # The short request joined after the long one had started and left before it ended.
    assert long_tokens_when_short_done and long_tokens_when_short_done[0] < 60


def test_a_cancelled_request_leaves_the_batch(loaded):
    ids = loaded.tokenizer(LOOSE[0])["input_ids"]
    events = generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=10_000, temperature=0))
    for ev in events:
        if isinstance(ev, TextDelta):
            break
    events.close()  # the client went away
    # A following request completes; the abandoned one is gone from the batch (not decoding 10k tokens).
    answer = list(generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=2, temperature=0)))
    assert answer[-1].finish_reason == "length"
    assert loaded.batcher.active_rows() <= 1


def test_a_request_with_many_choices_does_not_starve_others(tiny_dir):
    registry = Registry(device="cpu", max_batch_rows=4)
    loaded = registry.get(ModelRef(id="tiny", base=str(tiny_dir), weights_dir=None))
    ids = loaded.tokenizer(LOOSE[0])["input_ids"]
    order: list[str] = []
    big_started = threading.Event()

    def big() -> None:
        for ev in generate(
            loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=30, temperature=0), n=16
        ):
            big_started.set()
            if getattr(ev, "finish_reason", None):
                order.append("big")

    t = threading.Thread(target=big)
    t.start()
    assert big_started.wait(60)
    list(generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=30, temperature=0)))
    order.append("small")
    t.join(300)
    # Round-robin admission: the single-choice request finished before all 16 choices had.
    assert order.index("small") < len(order) - 1


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory) -> list[Path]:
    """Two LoRA fine-tunes of the tiny model with random (non-zero) weights."""
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base, _ = load_model(str(tiny_dir), device="cpu")
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(20.0)  # big enough to change greedy answers
        out = tmp_path_factory.mktemp(f"adapter-{seed}")
        model.save_pretrained(str(out))
        dirs.append(out)
    return dirs


def test_adapters_of_one_base_share_it_and_batch_together(tiny_dir, adapter_dirs, image_loader):
    registry = Registry(device="cpu")
    base = registry.get(ModelRef(id="tiny", base=str(tiny_dir), weights_dir=None))
    a = registry.get(ModelRef(id="ft:a", base=str(tiny_dir), weights_dir=adapter_dirs[0]))
    b = registry.get(ModelRef(id="ft:b", base=str(tiny_dir), weights_dir=adapter_dirs[1]))
    assert a.batcher is b.batcher is base.batcher and registry.loaded_ids() == ["tiny"]
    assert registry.adapter_ids() == ["ft:a", "ft:b"]

    # Reference: each fine-tune merged into its own plain copy of the base, asked alone.
    references = []
    for d in adapter_dirs:
        model, processor = load_model(str(tiny_dir), d, device="cpu")
        merged = LoadedModel(
            ref=ModelRef(id="ref", base=str(tiny_dir), weights_dir=d), model=merge(model), processor=processor
        )
        references.append([ask(merged, image_loader, t, temperature=0, max_tokens=12) for t in LOOSE[:2]])
    plain = [ask(base, image_loader, t, temperature=0, max_tokens=12) for t in LOOSE[:2]]
    assert references[0] != plain and references[1] != references[0]  # the adapters matter

    calls = [
        lambda m=m, t=t: ask(m, image_loader, t, temperature=0, max_tokens=12)
        for m in (a, b, base)
        for t in LOOSE[:2]
    ]
    together = concurrently(calls)
    assert together == references[0] + references[1] + plain


def test_the_adapter_cache_is_bounded_by_bytes(tiny_dir, adapter_dirs):
    one = sum(p.stat().st_size for p in adapter_dirs[0].glob("adapter_model*"))
    registry = Registry(device="cpu", adapter_cache_bytes=int(one * 1.5))
    registry.get(ModelRef(id="ft:a", base=str(tiny_dir), weights_dir=adapter_dirs[0]))
    b = registry.get(ModelRef(id="ft:b", base=str(tiny_dir), weights_dir=adapter_dirs[1]))
    assert registry.adapter_ids() == ["ft:b"]  # a was detached to make room
    assert len(b.model.peft_config) == 1
    again = registry.get(ModelRef(id="ft:a", base=str(tiny_dir), weights_dir=adapter_dirs[0]))
    assert registry.adapter_ids() == ["ft:a"] and len(again.model.peft_config) == 1


def test_stream_equals_non_stream_under_batching(loaded, image_loader, png_url):
    def streamed(text: str, **kw) -> str:
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": text}], "stream": True, **kw}
        )
        return "".join(
            c.choices[0].delta.content or ""
            for c in stream_completion(loaded, request, image_loader=image_loader)
            if c.choices
        )

    calls = [lambda t=t: {"s": streamed(t, temperature=0, max_tokens=20)} for t in LOOSE]
    plain = [ask(loaded, image_loader, t, temperature=0, max_tokens=20)["choices"][0]["text"] for t in LOOSE]
    assert [r["s"] for r in concurrently(calls)] == plain


class _TokenizerVocabOnly(LogitsProcessor):
    """Greedy over the tokenizer's vocabulary, as openft chooses (padded embedding rows excluded)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.size :] = -float("inf")
        return scores


@pytest.mark.parametrize("image", [None, (112, 56), (224, 224)])
def test_the_decode_loop_matches_transformers_generate(loaded, image_loader, png_url, image):
    """Our own prefill/decode loop (explicit positions, M-RoPE deltas) against HF's ``generate``."""
    assert_decode_loop_matches_generate(loaded, image_loader, png_url(image) if image else None)


def assert_decode_loop_matches_generate(loaded: LoadedModel, image_loader, image_url: str | None) -> None:
    """Greedy tokens of openft's decode loop == ``model.generate``'s for one (image) prompt."""
    from openft.inference.chat import build_prompt

    content: object = LOOSE[1]
    if image_url is not None:
        content = [
            {"type": "text", "text": LOOSE[1]},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}]}
    )
    assert_prompt_decodes_as_generate(loaded, build_prompt(loaded, request, image_loader=image_loader)[0])


def assert_prompt_decodes_as_generate(loaded: LoadedModel, prompt: Prompt, max_new_tokens: int = 12) -> None:
    """Greedy tokens of our prefill/decode loop are ``generate``'s (up to its end-of-sequence)."""
    from openft.inference.engine import _model_vision_inputs

    ours: list[int] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, logprobs=True)
    for ev in generate(loaded, prompt, params):
        ours += [lp.token_id for lp in ev.logprobs]
    ids = torch.tensor([prompt.input_ids])
    with loaded.batcher.lock, torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **_model_vision_inputs(prompt, loaded),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=sorted(loaded.eos_token_ids),
            pad_token_id=loaded.pad_token_id,
            logits_processor=LogitsProcessorList([_TokenizerVocabOnly(len(loaded.tokenizer))]),
        )
    theirs = out[0, ids.shape[1] :].tolist()
    eos = loaded.eos_token_ids
    assert ours == [t for t in theirs if t not in eos][: len(ours)] and len(ours) >= 1


def test_a_full_queue_refuses_with_a_retryable_error(tiny_dir):
    from openft.errors import RateLimited

    registry = Registry(device="cpu", max_batch_rows=1, max_waiting_rows=4)
    loaded = registry.get(ModelRef(id="tiny", base=str(tiny_dir), weights_dir=None))
    ids = loaded.tokenizer(LOOSE[0])["input_ids"]
    first = generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=10_000, temperature=0), n=5)
    next(first)  # one row decoding, four waiting: the queue is full
    with pytest.raises(RateLimited) as e:
        next(generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=2, temperature=0)))
    assert e.value.status_code == 429 and "retry" in e.value.message
    first.close()
    answer = list(generate(loaded, Prompt(input_ids=ids), SamplingParams(max_new_tokens=2, temperature=0)))
    assert answer[-1].finish_reason == "length"


def test_prompts_rendered_from_many_threads_are_the_prompts_rendered_alone(loaded, image_loader):
    """The fast tokenizer's split-special-tokens switch is shared state: renders must not race."""
    from openft.inference.chat import build_prompt

    requests = [
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": t}],
            }
        )
        for t in LOOSE
    ]
    alone = [build_prompt(loaded, r, image_loader=image_loader)[0].input_ids for r in requests]
    calls = [
        lambda r=r: {"ids": build_prompt(loaded, r, image_loader=image_loader)[0].input_ids}
        for r in requests * 16
    ]
    assert [c["ids"] for c in concurrently(calls)] == alone * 16
