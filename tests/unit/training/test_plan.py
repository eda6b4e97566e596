"""Training policy as a pure function: job facts + dataset stats + family in, a plan out (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from openft.errors import JobFailed
from openft.training.config import LoraConfig
from openft.training.plan import DatasetStats, JobFacts, default_training_type, plan_training

STATS = DatasetStats(examples=20, tokens_mean=100.0, tokens_p95=150, tokens_max=200)


def test_auto_is_full_for_the_tiny_model_and_lora_for_real_bases(tmp_path: Path) -> None:
    tiny = plan_training(JobFacts("openft-tiny-vlm", "supervised"), STATS, family="qwen2_vl")
    assert (tiny.training_type, tiny.lora, tiny.base_learning_rate) == ("full", None, 1e-3)
    real = plan_training(JobFacts("Qwen/Qwen2-VL-2B-Instruct", "supervised"), STATS, family="qwen2_vl")
    assert (real.training_type, real.lora, real.base_learning_rate) == ("lora", LoraConfig(), 2e-4)
    full = plan_training(
        JobFacts("Qwen/Qwen2-VL-2B-Instruct", "supervised", training_type="full"), STATS, family="qwen2_vl"
    )
    assert (full.training_type, full.base_learning_rate) == ("full", 1e-5)
    assert default_training_type(str(tmp_path / "cache" / "openft-tiny-vlm")) == "full"


def test_auto_continues_the_way_the_parent_was_trained() -> None:
    base = "Qwen/Qwen2-VL-2B-Instruct"
    on_full = JobFacts(base, "supervised", init_model="ft:a", parent_kind="full")
    on_adapter = JobFacts(base, "supervised", init_model="ft:b", parent_kind="adapter")
    assert plan_training(on_full, STATS, family=None).training_type == "full"
    assert plan_training(on_adapter, STATS, family=None).training_type == "lora"


def test_lora_on_a_fully_fine_tuned_parent_is_refused_with_what_to_do() -> None:
    facts = JobFacts(
        "openft-tiny-vlm", "supervised", training_type="lora", init_model="ft:x", parent_kind="full"
    )
    with pytest.raises(JobFailed) as err:
        plan_training(facts, STATS, family=None)
    assert err.value.code == "invalid_training_type" and err.value.param == "openft.training_type"
    assert "ft:x" in err.value.message and "'full' or 'auto'" in err.value.message


def test_hyperparameters_resolve_and_reach_the_recipe_config(tmp_path: Path) -> None:
    facts = JobFacts(
        "openft-tiny-vlm",
        "dpo",
        requested={"n_epochs": 2, "learning_rate_multiplier": 0.5, "batch_size": "auto"},
        train_vision_tower=True,
    )
    plan = plan_training(facts, STATS, family="qwen2_vl")
    assert plan.hyperparameters.to_dict() == {
        "n_epochs": 2,
        "batch_size": 1,
        "learning_rate_multiplier": 0.5,
        "beta": 0.1,
    }
    assert plan.to_dict() == {
        "hyperparameters": plan.hyperparameters.to_dict(),
        "training_type": "full",
        "base_learning_rate": 1e-3,
    }
    assert plan.announcement().startswith(
        "Fine-tuning job started (full): n_epochs=2, batch_size=1, learning_rate_multiplier=0.5 "
        "(base learning rate 0.001)."
    )
    cfg = plan.train_config(
        base_model="/models/tiny",
        output_dir=tmp_path,
        seed=7,
        device="cpu",
        init_weights=None,
        micro_batch_size=None,
    )
    assert (cfg.n_epochs, cfg.batch_size, cfg.learning_rate, cfg.seed) == (2, 1, 5e-4, 7)
    assert cfg.lora is None and cfg.train_vision_tower and not cfg.train_projector


def test_gradient_checkpointing_only_when_one_example_does_not_fit_without_it(tmp_path: Path) -> None:
    """The memory plan turns checkpointing (20-30% slower steps) on only when needed, and the
    recipe's config receives that choice."""
    from openft.models.loader import load_empty_model, resolve_base
    from openft.training.memory import plan_for_model
    from openft.training.plan import plan_memory

    model = load_empty_model(resolve_base("openft-tiny-vlm", tmp_path / "cache"))
    stats = DatasetStats(examples=64, tokens_mean=900.0, tokens_p95=1000, tokens_max=1024)
    plan = plan_training(
        JobFacts(base_model="openft-tiny-vlm", method="supervised"), stats, family="qwen2_vl"
    )
    batch = plan.hyperparameters.batch_size

    def need(micro: int, ckpt: bool) -> int:
        kw = dict(seq_len=1024, image_tokens=0, lora_rank=None, dpo=False, available=10**15)
        return plan_for_model(model, batch_size=micro, gradient_checkpointing=ckpt, **kw)[2].total

    roomy = plan_memory(model, plan, stats, dpo=False, device="cuda:0", limit_bytes=10**12)
    assert (roomy.gradient_checkpointing, roomy.micro_batch_size) == (False, None)
    # Room for one example without checkpointing: micro-batches of 1, still no checkpointing.
    tight = plan_memory(model, plan, stats, dpo=False, device="cuda:0", limit_bytes=need(1, False))
    assert (tight.gradient_checkpointing, tight.micro_batch_size) == (False, 1 if batch > 1 else None)
    # Not even one example fits without it: checkpointing on, and announced.
    squeezed = plan_memory(model, plan, stats, dpo=False, device="cuda:0", limit_bytes=need(1, True))
    assert squeezed.gradient_checkpointing and "Gradient checkpointing is on" in squeezed.announcement()
    assert squeezed.to_dict()["gradient_checkpointing"] is True
    cfg = plan.train_config(
        base_model="b",
        output_dir=tmp_path,
        seed=0,
        device="cuda",
        init_weights=None,
        micro_batch_size=squeezed.micro_batch_size,
        gradient_checkpointing=squeezed.gradient_checkpointing,
    )
    assert cfg.gradient_checkpointing is True


def test_parallelism_fsdp_only_for_full_training_that_does_not_fit_unless_asked() -> None:
    """auto: DDP for LoRA and for a full fine-tune that fits one device, FSDP2 when it does not;
    an explicit choice is honoured, except fsdp with LoRA (refused on any worker)."""
    from openft.training.plan import choose_parallelism

    def choose(requested: str, kind: str, nproc: int = 2, fits: bool = True) -> str:
        return choose_parallelism(requested, training_type=kind, nproc=nproc, fits_one_device=fits)  # type: ignore[arg-type]

    assert choose("auto", "full", nproc=1, fits=False) == "single"
    assert choose("fsdp", "full", nproc=1) == "single"
    assert choose("auto", "full") == "ddp"
    assert choose("auto", "full", fits=False) == "fsdp"
    assert choose("auto", "lora", fits=False) == "ddp"
    assert choose("fsdp", "full") == "fsdp"
    assert choose("ddp", "full", fits=False) == "ddp"
    for nproc in (1, 2):
        with pytest.raises(JobFailed) as e:
            choose("fsdp", "lora", nproc=nproc)
        assert e.value.param == "openft.parallelism" and "full fine-tuning only" in e.value.message


def test_plan_parallelism_shards_the_training_state_when_it_does_not_fit() -> None:
    """With a device too small for a full fine-tune's training state, ``auto`` on 2 processes picks
    FSDP2 and plans the batch with weights, gradients and AdamW state split in two; on one process
    the same job fails with the memory advice; with room, DDP."""
    from accelerate import init_empty_weights
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openft.training.plan import plan_memory, plan_parallelism

    config = Qwen2Config(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
    )
    with init_empty_weights():
        model = Qwen2ForCausalLM(config)  # ~52M parameters, ~830 MB of fp32 training state
    stats = DatasetStats(examples=8, tokens_mean=30.0, tokens_p95=32, tokens_max=32)
    full = plan_training(
        JobFacts(
            base_model="some/base", method="supervised", training_type="full", requested={"batch_size": 1}
        ),
        stats,
        family=None,
    )
    kw = dict(dpo=False, device="cuda:0")
    one = plan_memory(model, full, stats, limit_bytes=10**12, **kw).estimate_bytes
    sharded = plan_memory(model, full, stats, limit_bytes=10**12, shards=2, **kw).estimate_bytes
    assert sharded < 0.6 * one
    limit = (one + sharded) // 2
    two = plan_parallelism(model, full, stats, requested="auto", nproc=2, limit_bytes=limit, **kw)
    assert two.parallelism == "fsdp" and not two.memory.gradient_checkpointing
    assert "FSDP2" in two.announcement() and "do not fit one device" in two.announcement()
    with pytest.raises(JobFailed) as e:  # one process: not even checkpointing makes it fit
        plan_parallelism(model, full, stats, requested="auto", nproc=1, limit_bytes=limit, **kw)
    assert e.value.code == "insufficient_memory"
    roomy = plan_parallelism(model, full, stats, requested="auto", nproc=2, limit_bytes=10**12, **kw)
    assert roomy.parallelism == "ddp" and "DDP" in roomy.announcement()
    asked = plan_parallelism(model, full, stats, requested="fsdp", nproc=1, limit_bytes=10**12, **kw)
    assert asked.parallelism == "single" and "has no effect" in asked.announcement()
    cfg = full.train_config(
        base_model="b",
        output_dir=Path("/nonexistent"),
        seed=0,
        device="cpu",
        init_weights=None,
        micro_batch_size=None,
        parallelism=two.parallelism,
    )
    assert cfg.parallelism == "fsdp"


def test_cache_vision_features_reaches_the_recipe_with_lora_and_full_training(tmp_path: Path) -> None:
    real = "Qwen/Qwen2-VL-2B-Instruct"
    plan = plan_training(JobFacts(real, "supervised", cache_vision_features="off"), STATS, family="qwen2_vl")
    cfg = plan.train_config(
        base_model="/m", output_dir=tmp_path, seed=0, device="cpu", init_weights=None, micro_batch_size=None
    )
    assert cfg.lora is not None and cfg.cache_vision_features == "off"
    # training_type auto is full for the tiny model: it trains the projector on the frozen tower's
    # cached outputs.
    plan = plan_training(
        JobFacts("openft-tiny-vlm", "supervised", cache_vision_features="on"), STATS, family="qwen2_vl"
    )
    cfg = plan.train_config(
        base_model="/m", output_dir=tmp_path, seed=0, device="cpu", init_weights=None, micro_batch_size=None
    )
    assert cfg.lora is None and cfg.cache_vision_features == "on" and not cfg.train_vision_tower


@pytest.mark.parametrize("asked", ["plain", "chunked", "liger", "auto"])
def test_loss_kernel_reaches_the_recipe(tmp_path: Path, asked: str) -> None:
    plan = plan_training(JobFacts("openft-tiny-vlm", "supervised", loss_kernel=asked), STATS, family=None)  # type: ignore[arg-type]
    cfg = plan.train_config(
        base_model="/m", output_dir=tmp_path, seed=0, device="cpu", init_weights=None, micro_batch_size=None
    )
    assert plan.loss_kernel == asked and cfg.loss_kernel == asked


def _qwen_sized() -> object:
    """Qwen2-1.5B's shapes (151,936-token vocabulary, 28 layers), on the meta device."""
    from accelerate import init_empty_weights
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151_936,
        tie_word_embeddings=True,
    )
    with init_empty_weights():
        return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("kernel", ["chunked", "liger"])
def test_the_chunked_loss_frees_the_plan_from_checkpointing_and_micro_batches(kernel: str) -> None:
    """On an 80 GiB device a LoRA job on a Qwen-sized model needs gradient checkpointing for one
    8k-token example, and micro-batches for 4 x 2k tokens, only because of the plain loss's
    (n, 151,936) logits: with the chunked loss (or Liger's) the same jobs run as asked."""
    from openft.training.plan import plan_memory

    model = _qwen_sized()
    limit = 80 * 2**30
    for batch, tokens in ((1, 8192), (4, 2048)):
        stats = DatasetStats(examples=64, tokens_mean=tokens * 0.8, tokens_p95=tokens, tokens_max=tokens)
        plan = plan_training(
            JobFacts("Qwen/Qwen2.5-1.5B", "supervised", requested={"batch_size": batch}, max_length=8192),
            stats,
            family=None,
        )
        assert plan.lora is not None
        kw = dict(dpo=False, device="cuda:0", limit_bytes=limit)
        plain = plan_memory(model, plan, stats, loss_kernel="plain", **kw)
        chunked = plan_memory(model, plan, stats, loss_kernel=kernel, **kw)
        assert plain.gradient_checkpointing or plain.grad_accum_steps > 1, plain
        if batch == 1:
            assert plain.gradient_checkpointing, plain
        else:
            assert plain.grad_accum_steps > 1 and not plain.gradient_checkpointing, plain
        assert not chunked.gradient_checkpointing and chunked.grad_accum_steps == 1, chunked
        assert chunked.micro_batch_size is None and chunked.estimate_bytes < limit


def test_the_plain_loss_plan_counts_the_trained_tokens_the_validation_found() -> None:
    """The plain loss runs the head at labelled positions only: 8k-token prompts with 64-token
    answers hold 64 rows of (151,936) logits, not 8,192. With the validation's count of trained
    tokens the plan needs no checkpointing; without it (an estimate) it stays conservative."""
    from dataclasses import replace

    from openft.training.plan import plan_memory

    model = _qwen_sized()
    unknown = DatasetStats(examples=64, tokens_mean=8000.0, tokens_p95=8192, tokens_max=8192)
    known = replace(unknown, trained_max=64)
    plan = plan_training(
        JobFacts("Qwen/Qwen2.5-1.5B", "supervised", requested={"batch_size": 1}, max_length=8192),
        unknown,
        family=None,
    )
    kw = dict(dpo=False, device="cuda:0", limit_bytes=80 * 2**30, loss_kernel="plain")
    conservative = plan_memory(model, plan, unknown, **kw)
    counted = plan_memory(model, plan, known, **kw)
    assert conservative.gradient_checkpointing, conservative
    assert not counted.gradient_checkpointing and counted.grad_accum_steps == 1, counted
    assert counted.estimate_bytes < counted.available_bytes


def test_fsdp_plans_plain_logits_and_refuses_an_explicit_chunked_loss() -> None:
    """FSDP shards the lm_head, so only the plain loss runs under it: its plan counts plain logits,
    and a job that asked for chunked (or Liger) is refused with what to do."""
    from openft.training.plan import plan_memory, plan_parallelism

    model = _qwen_sized()
    stats = DatasetStats(examples=8, tokens_mean=200.0, tokens_p95=256, tokens_max=256)
    facts = dict(
        base_model="some/base", method="supervised", training_type="full", requested={"batch_size": 1}
    )
    full = plan_training(JobFacts(**facts), stats, family=None)  # type: ignore[arg-type]
    kw = dict(dpo=False, device="cuda:0")
    one = plan_memory(model, full, stats, limit_bytes=10**13, loss_kernel="chunked", **kw).estimate_bytes
    sharded = plan_memory(model, full, stats, limit_bytes=10**13, shards=2, loss_kernel="plain", **kw)
    limit = (one + sharded.estimate_bytes) // 2  # fits only when sharded
    two = plan_parallelism(
        model, full, stats, requested="auto", nproc=2, limit_bytes=limit, loss_kernel="chunked", **kw
    )
    assert two.parallelism == "fsdp" and two.memory.estimate_bytes == sharded.estimate_bytes
    asked = plan_training(JobFacts(**facts, loss_kernel="chunked"), stats, family=None)  # type: ignore[arg-type]
    with pytest.raises(JobFailed) as e:
        plan_parallelism(
            model, asked, stats, requested="auto", nproc=2, limit_bytes=limit, loss_kernel="chunked", **kw
        )
    assert e.value.param == "openft.loss_kernel" and "parallelism 'ddp'" in e.value.message


def test_plan_loss_kernel_resolves_on_the_worker_and_refuses_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the memory plan counts: chunked on CPU for ``auto``; Liger on CUDA where installed;
    ``liger`` on a CPU worker, or a CUDA one without liger-kernel, fails the job saying why."""
    import openft.training.setup as training_setup
    from openft.training.plan import LossKernel, TrainingPlan, plan_loss_kernel

    model = _qwen_sized()

    def plan(kernel: LossKernel) -> TrainingPlan:
        return plan_training(
            JobFacts("Qwen/Qwen2.5-1.5B", "supervised", loss_kernel=kernel), STATS, family=None
        )

    assert plan_loss_kernel(model, plan("auto"), device="cpu") == "chunked"
    assert plan_loss_kernel(model, plan("plain"), device="cpu") == "plain"
    monkeypatch.setattr(training_setup, "_liger_model_types", lambda: frozenset({"qwen2"}))
    assert plan_loss_kernel(model, plan("auto"), device="cuda:0") == "liger"
    for device, why in (("cpu", "Liger kernels need CUDA (device is cpu)"), ("cuda:0", "not installed")):
        if device == "cuda:0":
            monkeypatch.setattr(training_setup, "_liger_model_types", lambda: None)
        with pytest.raises(JobFailed) as e:
            plan_loss_kernel(model, plan("liger"), device=device)
        assert e.value.param == "openft.loss_kernel" and e.value.code == "unsupported_parameter"
        assert (
            e.value.message.startswith("openft.loss_kernel 'liger' cannot be used") and why in e.value.message
        )
    assert plan_loss_kernel(model, plan("auto"), device="cuda:0") == "chunked"
