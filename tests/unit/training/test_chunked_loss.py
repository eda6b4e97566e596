"""The chunked linear cross-entropy: the loss, log-probs, accuracy and gradients of full logits.

Function level against ``LogitHead.logits`` + the plain losses (chunks that do and do not divide
n, n = 0, bias, softcapping, scaling, a frozen head), then through ``Feeder.forward`` on tiny
random models (tied embeddings, Gemma 3's softcapping) and a few AdamW steps, and the table of
:func:`choose_loss_kernel`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

import openft.training.loss as loss_module
import openft.training.setup as training_setup
from openft.errors import JobFailed
from openft.models.render import IGNORE_INDEX, Rendered
from openft.training.config import TrainConfig
from openft.training.loss import (
    LogitHead,
    Scores,
    choose_loss_kernel,
    chunk_rows,
    chunked_logprobs,
    labelled_logprobs,
    labelled_loss,
    logit_transform,
    row_logprobs,
    token_loss,
)
from openft.training.setup import Feeder, loss_kernel_for
from tests.unit.training.test_packing import _feeder as padded_feeder

N, H, V = 23, 16, 97
HEADS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.0},
    "scaled+bias": {"scale": 0.25, "bias": True},
}


def _head(*, bias: bool = False, scale: float = 1.0, softcap: float | None = None) -> LogitHead:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    return LogitHead(weight, b, scale, softcap)


def _inputs(n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(n, H, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    rows = torch.sort(torch.randint(0, 3, (n,), generator=g)).values
    return hidden, targets, rows


def _grads(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors if t is not None]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, N, 64], ids=["1", "5-not-dividing", "n", "more-than-n"])
@pytest.mark.parametrize("kind", HEADS, ids=list(HEADS))
def test_chunked_sft_loss_accuracy_and_gradients_equal_full_logits(kind: str, rows: int) -> None:
    head = _head(**HEADS[kind])
    hidden, targets, _ = _inputs()
    want_loss, want_acc = token_loss(head.logits(hidden), targets)
    want_loss.backward()
    want = _grads(hidden, head.weight, head.bias)

    logps, hits = chunked_logprobs(hidden, head, targets, rows=rows)
    loss = -logps.mean()
    loss.backward()
    got = _grads(hidden, head.weight, head.bias)
    _close(loss, want_loss)
    assert hits.float().mean() == want_acc
    assert len(got) == len(want) == (3 if head.bias is not None else 2)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("rows", [4, 7])
@pytest.mark.parametrize("kind", HEADS, ids=list(HEADS))
def test_chunked_row_logprobs_and_their_gradients_equal_full_logits(kind: str, rows: int) -> None:
    """DPO's summed log-probs per row, under an arbitrary upstream gradient per row."""
    head = _head(**HEADS[kind])
    hidden, targets, row_of = _inputs()
    upstream = torch.tensor([0.7, -1.3, 2.1])
    want = row_logprobs(head.logits(hidden), targets, row_of, 3)
    (want * upstream).sum().backward()
    want_grads = _grads(hidden, head.weight, head.bias)

    logps, _ = chunked_logprobs(hidden, head, targets, rows=rows)
    got = torch.zeros(3).index_add(0, row_of, logps)
    (got * upstream).sum().backward()
    _close(got, want)
    for g, w in zip(_grads(hidden, head.weight, head.bias), want_grads, strict=True):
        _close(g, w)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do() -> None:
    head = _head(bias=True)
    frozen = LogitHead(head.weight.detach(), head.bias.detach())  # type: ignore[union-attr]
    hidden, targets, _ = _inputs()
    token_loss(frozen.logits(hidden), targets)[0].backward()
    (want,) = _grads(hidden)
    (-chunked_logprobs(hidden, frozen, targets, rows=6)[0].mean()).backward()
    _close(hidden.grad, want)  # type: ignore[arg-type]
    assert frozen.weight.grad is None and frozen.bias.grad is None  # type: ignore[union-attr]


def test_no_labelled_token_gives_a_zero_loss_that_still_backpropagates() -> None:
    head = _head()
    hidden, targets, row_of = _inputs(0)
    scores = Scores(None, targets, row_of, 2, hidden, head, "chunked")
    loss, accuracy = labelled_loss(scores)
    loss.backward()
    assert loss.item() == 0.0 and accuracy.item() == 0.0
    assert hidden.grad is not None and hidden.grad.shape == (0, H)
    logps, hits = labelled_logprobs(scores)
    assert logps.tolist() == [0.0, 0.0] and hits.shape == (0,)


def test_chunks_hold_a_bounded_block_of_logits() -> None:
    assert chunk_rows(151_936) == 441  # 256 MiB of fp32 logits at Qwen's vocabulary
    assert chunk_rows(10**10) == 1


# --- through Feeder.forward on tiny models ----------------------------------------------------


SIZES = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attn_implementation": "sdpa",
}


def _qwen2(*, tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=tied))


def _gemma3(softcap: float | None = 3.0) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**SIZES, head_dim=8, final_logit_softcapping=softcap))


def _items() -> list[Rendered]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((9, 3), (14, 6), (5, 5)):  # the last one has no labelled token
        ids = torch.randint(1, V, (n,), generator=g).tolist()
        out.append(Rendered(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _feeder(kernel: str) -> Feeder:
    return dataclasses.replace(padded_feeder(packing=False), loss_kernel=kernel)


MODELS = {
    "qwen2-tied": lambda: _qwen2(tied=True),
    "qwen2": lambda: _qwen2(tied=False),
    "gemma3-softcap": _gemma3,
}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows: a batch of these tiny models fits one default chunk, which takes the
    plain one-chunk path; the chunked Function itself must run here."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 3 * V)  # 3 rows


@pytest.mark.parametrize("build", MODELS.values(), ids=list(MODELS))
def test_feeder_chunked_gives_the_loss_logprobs_and_every_gradient_of_plain(build, small_chunks) -> None:  # type: ignore[no-untyped-def]
    model = build().train()
    items = _items()
    results = {}
    for kernel in ("plain", "chunked"):
        feeder = _feeder(kernel)
        model.zero_grad(set_to_none=True)
        scores = feeder.forward(model, feeder.collate(items))
        assert (scores.logits is None) == (kernel == "chunked")
        loss, accuracy = labelled_loss(scores)
        logps, hits = labelled_logprobs(scores)
        (loss + (logps * torch.tensor([0.5, -0.2, 1.0])).sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[kernel] = (loss, accuracy, logps, hits, grads)
    plain, chunked = results["plain"], results["chunked"]
    _close(chunked[0], plain[0])
    assert chunked[1] == plain[1]
    _close(chunked[2], plain[2])
    assert torch.equal(chunked[3], plain[3])
    assert chunked[4].keys() == plain[4].keys() and "model.embed_tokens.weight" in plain[4]
    for k, g in plain[4].items():
        torch.testing.assert_close(chunked[4][k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_a_head_whose_logits_are_post_processed_unseen_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first forward checks the model's own logits for one row against the head's: a family
    that softcaps where ``logit_transform`` says it does not would otherwise train on wrong logits."""
    monkeypatch.setattr(training_setup, "logit_transform", lambda config: (1.0, None))
    feeder = _feeder("chunked")
    with pytest.raises(JobFailed, match='extra_body.openft.loss_kernel = "plain"') as e:
        feeder.forward(_gemma3(softcap=0.5), feeder.collate(_items()))
    assert e.value.param == "openft.loss_kernel"  # the job's error names the setting as users write it


def test_a_few_adamw_steps_give_the_losses_of_plain(small_chunks: None) -> None:
    losses = {}
    for kernel in ("plain", "chunked"):
        model = _qwen2(tied=True).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        feeder = _feeder(kernel)
        batch = feeder.collate(_items())
        losses[kernel] = []
        for _ in range(4):
            loss, _ = labelled_loss(feeder.forward(model, batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[kernel].append(loss.item())
    assert losses["chunked"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["plain"][-1] < losses["plain"][0]  # it trained


def test_loss_kernel_for_falls_back_to_plain_where_the_head_cannot_be_taken_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def cfg(**kw: object) -> TrainConfig:
        base = {"base_model": "b", "output_dir": tmp_path, "n_epochs": 1, "batch_size": 1}
        return TrainConfig(**base, learning_rate=1e-3, seed=0, **kw)  # type: ignore[arg-type]

    cpu = torch.device("cpu")
    model = _qwen2(tied=False)
    assert loss_kernel_for(cfg(), model, cpu) == ("chunked", "Liger kernels need CUDA (device is cpu)")
    assert loss_kernel_for(cfg(labelled_logits=False), model, cpu) == ("plain", "labelled_logits is off")
    with pytest.raises(ValueError, match="labelled_logits is off"):
        loss_kernel_for(cfg(labelled_logits=False, loss_kernel="chunked"), model, cpu)
    with pytest.raises(ValueError, match="need CUDA"):
        loss_kernel_for(cfg(loss_kernel="liger"), model, cpu)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # e.g. a wrapper around the head
    kernel, why = loss_kernel_for(cfg(), model, cpu)
    assert kernel == "plain" and "not a plain Linear" in why
    with pytest.raises(ValueError, match="invalid TrainConfig: loss_kernel"):
        cfg(loss_kernel="fused")


def test_logit_transform_knows_softcapping_and_refuses_unknown_families() -> None:
    assert logit_transform(_gemma3(softcap=30.0).config) == (1.0, 30.0)
    assert logit_transform(_gemma3(softcap=None).config) == (1.0, None)
    assert logit_transform(_qwen2(tied=True).config) == (1.0, None)

    class Unknown:
        model_type = "some_new_family"

    assert logit_transform(Unknown()) is None


LIGER = frozenset({"qwen2", "qwen2_vl", "llama"})


@pytest.mark.parametrize(
    ("requested", "device", "installed", "model_type", "problem", "want"),
    [
        ("auto", "cpu", None, "qwen2", None, ("chunked", "Liger kernels need CUDA (device is cpu)")),
        ("auto", "cpu", LIGER, "qwen2", None, ("chunked", "Liger kernels need CUDA (device is cpu)")),
        ("auto", "cuda", None, "qwen2", None, ("chunked", "liger-kernel is not installed")),
        ("auto", "cuda", LIGER, "qwen2_vl", None, ("liger", "Liger kernels on CUDA for qwen2_vl")),
        ("auto", "cuda", LIGER, "idefics3", None, ("chunked", "no Liger kernels for idefics3 models")),
        ("auto", "cuda", LIGER, "qwen2", "FSDP shards the lm_head", ("plain", "FSDP shards the lm_head")),
        ("plain", "cuda", LIGER, "qwen2", None, ("plain", "asked for")),
        ("chunked", "cuda", LIGER, "qwen2", None, ("chunked", "asked for")),
        ("liger", "cuda", LIGER, "llama", None, ("liger", "asked for")),
        ("liger", "cpu", LIGER, "llama", None, ValueError("need CUDA")),
        ("liger", "cuda", None, "llama", None, ValueError("not installed")),
        ("liger", "cuda", LIGER, "idefics3", None, ValueError("no Liger kernels for idefics3")),
        ("chunked", "cpu", None, "qwen2", "FSDP shards the lm_head", ValueError("FSDP shards")),
        ("fused", "cpu", None, "qwen2", None, ValueError("must be one of")),
    ],
)
def test_choose_loss_kernel_table(requested, device, installed, model_type, problem, want) -> None:  # type: ignore[no-untyped-def]
    def choose() -> tuple[str, str]:
        return choose_loss_kernel(
            requested,
            device_type=device,
            liger_model_types=installed,
            model_type=model_type,
            head_problem=problem,
        )

    if isinstance(want, ValueError):
        with pytest.raises(ValueError, match=str(want)):
            choose()
        return
    kernel, why = choose()
    assert kernel == want[0] and want[1] in why


def test_a_bf16_matmul_as_under_autocast_stays_close_to_plain_bf16_logits() -> None:
    """On CUDA the head's matmul runs in autocast's bf16 (``LogitHead.dtype``) like the model's own
    lm_head would; the weight gradient is still summed over chunks in fp32."""
    head = _head(bias=True)
    hidden, targets, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, _ = token_loss(head.logits(hidden), targets)
    want_loss.backward()
    want = _grads(hidden, head.weight, head.bias)
    low = LogitHead(head.weight, head.bias, dtype=torch.bfloat16)
    (-chunked_logprobs(hidden, low, targets, rows=6)[0].mean()).backward()
    got = _grads(hidden, head.weight, head.bias)
    assert [g.dtype for g in got] == [torch.float32] * 3  # the parameters' own dtype
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)
