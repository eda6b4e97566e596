"""Issue 17: jobs on N processes (torch.distributed, gloo on CPU) train like one process and survive
a killed rank. Every rank uses one torch thread (OPENFT_TORCH_THREADS=1; the machine is shared)."""

from __future__ import annotations

import functools
import io
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import model_cache, start_server
from tests.integration.test_job_control import csv_rows, last_step, wait_until
from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, preference_jsonl, to_jsonl

pytestmark = pytest.mark.slow

ENV = {"OPENFT_TORCH_THREADS": "1", "OPENFT_LEASE_SECONDS": "5"}
N_EXAMPLES, N_EPOCHS, BATCH = 40, 3, 3  # 14 steps an epoch (the last batch has 1 example: one rank idles)
STEPS = 14 * N_EPOCHS
RTOL = 2e-3
HP = {"n_epochs": N_EPOCHS, "batch_size": BATCH, "learning_rate_multiplier": 2.0}
TRAIN = to_jsonl(colour_examples(N_EXAMPLES, seed=3))


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _ranks(server_pid: int) -> list[int]:
    """The training processes (``spawn`` children) under a server, oldest first."""
    ranks = []
    for pid in _children(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            ranks.append(pid)
    return sorted(ranks)


def _losses(c, job) -> list[float]:
    return [float(r["train_loss"]) for r in csv_rows(c, job)]


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert worst < RTOL, (worst, a, b)


@dataclass
class Trained:
    """What a job run through a real server left behind."""

    losses: list[float]
    """``train_loss`` of every step, from the job's result file."""
    csv_steps: list[int]
    metric_steps: list[int]
    """Steps of the job's ``metrics`` events, sorted."""
    messages: list[str]
    reply: str | None
    """The fine-tuned model's chat answer."""


def _train(
    home: Path, *, nproc: int = 1, openft: dict | None = None, kill_a_rank_at: int | None = None
) -> Trained:
    """The same SFT job (``HP``, seed 5, the colour task) through ``openft serve --nproc N``; with
    ``kill_a_rank_at``, the youngest rank is SIGKILLed once that step's metrics are recorded. The job
    must succeed, its ranks exit with it, and its model must answer chat."""
    extra = ("--nproc", str(nproc)) if nproc > 1 else ()
    server = start_server(home, "--workers", "1", *extra, env=ENV, new_session=nproc > 1)
    try:
        c = server.client("dist")
        f = c.files.create(file=("t.jsonl", io.BytesIO(TRAIN)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            training_file=f.id,
            model="openft-tiny-vlm",
            hyperparameters=HP,
            seed=5,
            extra_body={"openft": openft} if openft else None,
        )
        if kill_a_rank_at is not None:
            wait_until(lambda: last_step(c, job.id) >= kill_a_rank_at)
            ranks = _ranks(server.proc.pid)
            assert len(ranks) == nproc, ranks
            os.kill(ranks[-1], signal.SIGKILL)
        done = wait_for(c, job.id)
        assert done.status == "succeeded", done.error
        events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data
        reply = c.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert not _ranks(server.proc.pid)  # the ranks exited with their job
        return Trained(
            losses=_losses(c, done),
            csv_steps=[int(r["step"]) for r in csv_rows(c, done)],
            metric_steps=sorted(e.data["step"] for e in events if e.type == "metrics"),
            messages=[e.message for e in events],
            reply=reply.choices[0].message.content,
        )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The job on one process: the losses every multi-process run must reproduce."""
    return _train(tmp_path_factory.mktemp("one") / "home")


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one_and_survive_a_killed_rank(
    tmp_path: Path, one_process: Trained, parallelism: str
) -> None:
    """Through the real worker: the job on 2 processes (gloo), DDP or FSDP2 (``openft.parallelism``),
    with one rank SIGKILLed after the first epoch. The job restarts both ranks from its saved state,
    finishes with every step's metrics exactly once and events from rank 0 only, its per-step
    losses equal the 1-process job's within 2e-3 relative, and its model answers chat."""
    two = _train(tmp_path / "home", nproc=2, openft={"parallelism": parallelism}, kill_a_rank_at=16)
    # Killed past the first epoch's saved state: the restart resumes mid-run and re-runs steps whose
    # metrics were already recorded, yet each step is reported once.
    assert two.metric_steps == two.csv_steps == list(range(1, STEPS + 1))
    assert sum("restarting all 2 processes from the last saved state" in m for m in two.messages) == 1
    assert sum(m.startswith("Job resumed at step") for m in two.messages) == 1
    assert sum(m.startswith("training on 40 examples") for m in two.messages) == 1  # rank 0 only
    how = {"ddp": "with DDP", "fsdp": "with FSDP2"}[parallelism]
    assert sum(m.startswith(f"Training on 2 processes {how}") for m in two.messages) == 1
    _close(one_process.losses, two.losses)
    assert two.reply is not None


def _config(tmp_path: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    """The tiny model's recipe configuration for the direct (no server) launches below."""
    from openft.models.loader import resolve_base
    from openft.training.config import TrainConfig

    settings: dict = dict(n_epochs=2, batch_size=4, learning_rate=1e-3, seed=0, device="cpu")
    return TrainConfig(
        base_model=resolve_base("openft-tiny-vlm", model_cache()),
        output_dir=tmp_path / name,
        **(settings | overrides),
    )


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_dpo_on_two_processes_matches_one(tmp_path: Path, parallelism: str) -> None:
    """The DPO recipe (full fine-tuning, precomputed reference) launched on 2 ranks, DDP or FSDP2,
    reports the same per-step losses as on one process."""
    from openft.datasets.validate import validate_file
    from openft.models.loader import load_processor, resolve_base
    from openft.models.validation import model_validation_options
    from openft.training import distributed
    from openft.training.recipes import dpo
    from openft.training.reporter import ListReporter

    options = model_validation_options(load_processor(resolve_base("openft-tiny-vlm", model_cache())))
    examples = validate_file(
        io.BufferedReader(io.BytesIO(preference_jsonl(15, seed=2))), method="dpo", options=options
    ).examples

    one = ListReporter()
    dpo.run(_config(tmp_path, "one"), examples, one, beta=0.1)
    two = ListReporter()
    cfg = _config(tmp_path, "two", parallelism=parallelism)
    distributed.launch(functools.partial(dpo.run, cfg, examples, beta=0.1), two, nproc=2, threads=1)
    a, b = [s["train_loss"] for s in one.steps], [s["train_loss"] for s in two.steps]
    assert len(a) == 8 and _rel(a, b) < RTOL, (a, b)
    assert [s["step"] for s in two.steps] == list(range(1, 9))
    assert two.checkpoints and two.checkpoints[-1]["weights_dir"].exists()


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_a_pause_stops_every_rank_and_they_resume_where_it_left(tmp_path: Path, parallelism: str) -> None:
    """A stop asked of rank 0 (pause, cancel, worker shutdown) stops both ranks at one step
    boundary with the state saved; a second launch resumes there (every rank loads it) and ends
    with the 1-process run's losses. Under FSDP2 each rank writes its own shards of the state (no
    gathered weights or optimizer file), while each checkpoint is gathered whole: an ordinary
    Hugging Face folder (the architecture's own class name) holding the 1-process run's weights.
    The same paused state also resumes under another layout with the same losses: FSDP's 2-rank
    shards on one process, DDP's full-format state under FSDP2 on 2 ranks."""
    import json
    import random
    import shutil

    from safetensors.torch import load_file

    from openft.errors import JobCancelled
    from openft.training import distributed
    from openft.training.recipes import sft
    from openft.training.reporter import ListReporter
    from tests.integration.test_sft_recipe import _example, _prompt

    rng = random.Random(1)
    train = [_example(i + 1, *_prompt(rng)) for i in range(20)]
    one = ListReporter()
    sft.run(_config(tmp_path, "one", micro_batch_size=1), train, one)
    cfg = _config(tmp_path, "two", micro_batch_size=1, parallelism=parallelism)
    paused = ListReporter(stop_after=3)
    with pytest.raises(JobCancelled, match="stopped at step 3 of 10"):
        distributed.launch(functools.partial(sft.run, cfg, train, resume=True), paused, nproc=2, threads=1)
    assert [s["step"] for s in paused.steps] == [1, 2, 3]
    state = cfg.output_dir / "state"
    if parallelism == "fsdp":
        assert sorted(p.name for p in (state / "shards").iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
        assert not (state / "trainable.safetensors").exists() and not (state / "optimizer.pt").exists()
    else:
        assert (state / "trainable.safetensors").exists() and not (state / "shards").exists()
    shutil.copytree(cfg.output_dir, tmp_path / "other")

    resumed = ListReporter()
    distributed.launch(functools.partial(sft.run, cfg, train, resume=True), resumed, nproc=2, threads=1)
    assert [m for _, m in resumed.messages if m.startswith("Job resumed")] == [
        "Job resumed at step 3 of 10 (epoch 1, batch 4)"
    ]
    steps = paused.steps + resumed.steps
    assert [s["step"] for s in steps] == list(range(1, 11))
    a, b = [s["train_loss"] for s in one.steps], [s["train_loss"] for s in steps]
    assert _rel(a, b) < RTOL, (a, b)
    assert [c["step"] for c in resumed.checkpoints] == [5, 10]
    final = resumed.checkpoints[-1]["weights_dir"]
    single = one.checkpoints[-1]["weights_dir"]
    assert json.loads((final / "config.json").read_text())["architectures"] == [
        "Qwen2VLForConditionalGeneration"
    ]
    mine, theirs = load_file(final / "model.safetensors"), load_file(single / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        assert (mine[name] - t).abs().max() <= 1e-3 * max(1.0, t.abs().max().item()), name

    # The paused state under the other layout: FSDP's shards resharded onto one process, DDP's
    # full state split into FSDP2 shards.
    elsewhere = ListReporter()
    if parallelism == "fsdp":
        sft.run(_config(tmp_path, "other", micro_batch_size=1), train, elsewhere, resume=True)
    else:
        other = _config(tmp_path, "other", micro_batch_size=1, parallelism="fsdp")
        distributed.launch(
            functools.partial(sft.run, other, train, resume=True), elsewhere, nproc=2, threads=1
        )
    assert [m for _, m in elsewhere.messages if m.startswith("Job resumed")] == [
        "Job resumed at step 3 of 10 (epoch 1, batch 4)"
    ]
    assert _rel(a, [s["train_loss"] for s in paused.steps + elsewhere.steps]) < RTOL


def _load_on_ranks(cfg, reporter):  # type: ignore[no-untyped-def]
    """In each rank: the recipe's own setup and sharding; what each rank held before sharding, and
    the weights and buffers it ends with (rank 0 returns everyone's)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from openft.training import distributed
    from openft.training.setup import setup

    model = setup(cfg, reporter).model
    meta_params = [p.is_meta for p in model.parameters()]
    meta_buffers = [b.is_meta for b in model.buffers()]
    distributed.shard(model, torch.device("cpu"), vision_blocks=True, bf16=False)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    mine = {
        "meta_params": (all(meta_params), any(meta_params)),
        "meta_buffers": any(meta_buffers),
        "buffers": {n: b.tolist() for n, b in model.named_buffers()},
        "local_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters()),
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
    }
    everyone: list = [None] * distributed.world_size()
    dist.all_gather_object(everyone, mine)
    # Plain lists: tensors sent back through the launcher's pipe would travel as shared memory.
    return {"ranks": everyone, "full": {k: v.tolist() for k, v in full.items()}}


def _pretrained_as(form: str, base: Path, out: Path) -> Path:
    """The tiny model's folder with its weights stored another way: ``tied`` (embeddings shared, so
    stored once), ``index`` (Hugging Face's sharded safetensors with model.safetensors.index.json),
    ``bin`` (a PyTorch pickle, not safetensors)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if form == "3-ranks":  # as generated: one model.safetensors, untied embeddings
        return base
    folder = shutil.copytree(base, out / form)
    weights = load_file(folder / "model.safetensors")
    if form == "tied":
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(config))
        del weights["lm_head.weight"]  # a tied checkpoint stores the embeddings once
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    elif form == "index":
        from huggingface_hub import save_torch_state_dict

        (folder / "model.safetensors").unlink()
        save_torch_state_dict(weights, folder, max_shard_size=300_000)
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 3
    else:
        (folder / "model.safetensors").unlink()
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("form", ["3-ranks", "tied", "index", "bin"])
def test_fsdp_ranks_read_only_their_slices_of_the_weights(tmp_path: Path, form: str) -> None:
    """Under FSDP2 on 2 ranks no rank reads the whole pretrained model: both build every parameter
    on the meta device (buffers real: the rotary inverse frequencies, in no state dict, are
    computed) and each reads only its own slices from the safetensors, one file or Hugging Face's
    sharded form with its index; weights in a ``.bin`` are read by rank 0 alone, the others getting
    their shards from it. Either way each rank holds about half the weights, the gathered model
    equals the pretrained one exactly and the buffers equal the loaded ones. With tied input and
    output embeddings (stored once) both ranks keep them one parameter. On 3 ranks most tensors
    split unevenly (FSDP2 pads the last chunk; a rank past a short tensor's end owns no rows)."""
    import dataclasses

    import torch

    from openft.models.loader import load_model
    from openft.training import distributed
    from openft.training.reporter import ListReporter

    cfg = _config(tmp_path, "load", parallelism="fsdp")
    cfg = dataclasses.replace(cfg, base_model=str(_pretrained_as(form, Path(cfg.base_model), tmp_path)))
    tied = form == "tied"
    nproc = 3 if form == "3-ranks" else 2
    out = distributed.launch(functools.partial(_load_on_ranks, cfg), ListReporter(), nproc=nproc, threads=1)
    zero, *others = out["ranks"]
    assert zero["meta_params"] == ((False, False) if form == "bin" else (True, True))
    assert all(r["meta_params"] == (True, True) for r in others)
    assert not any(r["meta_buffers"] for r in out["ranks"])
    pretrained, _ = load_model(cfg.base_model, device="cpu")
    assert (pretrained.get_output_embeddings().weight is pretrained.get_input_embeddings().weight) is tied
    assert all(r["tied"] is tied for r in out["ranks"])
    weights = pretrained.state_dict()
    assert out["full"].keys() == weights.keys()
    for name, t in weights.items():
        assert torch.equal(torch.tensor(out["full"][name], dtype=t.dtype), t), name
    total = sum(p.numel() * p.element_size() for p in pretrained.parameters())
    for rank in out["ranks"]:
        assert rank["local_bytes"] < 1.2 * total / nproc, (rank["local_bytes"], total)
    buffers = dict(pretrained.named_buffers())
    assert {n for n in buffers if n.endswith("inv_freq")}
    for rank in out["ranks"]:
        assert rank["buffers"].keys() == buffers.keys()
        for name, b in buffers.items():
            assert torch.equal(torch.tensor(rank["buffers"][name], dtype=b.dtype), b), name


def _checkpoint_on_ranks(cfg, reporter):  # type: ignore[no-untyped-def]
    """In each rank: the recipe's setup and sharding, then the epoch checkpoint written a file at a
    time (files of at most 300 kB); returns its folder (rank 0)."""
    import torch

    from openft.training import distributed, fsdp_io, progress
    from openft.training.setup import setup

    fsdp_io.MAX_FILE_BYTES = 300_000
    model, processor = setup(cfg, reporter)[:2]
    distributed.shard(model, torch.device("cpu"), vision_blocks=True, bf16=False)
    return str(progress._save_sharded_checkpoint(model, processor, cfg, step=7))


def test_fsdp_checkpoint_is_written_a_file_at_a_time_with_the_same_tensors(tmp_path: Path) -> None:
    """The epoch checkpoint of a sharded model, gathered one tensor at a time and written by rank 0
    in files of at most the set size (Hugging Face's sharded form: model-0000k-of-0000N.safetensors
    + model.safetensors.index.json), holds exactly the tensors, names and config one process writes
    for the same (here: the pretrained) weights, loads with transformers (``load_model``: what
    serving and resumed jobs use), and survives the content-addressed blob store's round trip
    (stored as a folder, materialised). Tied embeddings: stored once, as one process stores them
    (the untied case is the recipe's own checkpoint in the pause test above)."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import load_file

    from openft.models.loader import load_model
    from openft.storage.blobs import LocalBlobStore
    from openft.training import distributed
    from openft.training.reporter import ListReporter

    cfg = _config(tmp_path, "ckpt", parallelism="fsdp")
    cfg = dataclasses.replace(cfg, base_model=str(_pretrained_as("tied", Path(cfg.base_model), tmp_path)))
    fn = functools.partial(_checkpoint_on_ranks, cfg)
    new = Path(distributed.launch(fn, ListReporter(), nproc=2, threads=1))
    old = tmp_path / "one-process"
    pretrained_model = load_model(cfg.base_model, device="cpu", trainable=True)[0]
    pretrained_model.save_pretrained(old)
    assert new == cfg.output_dir / "step-7" and not (new / "model.safetensors").exists()
    index = json.loads((new / "model.safetensors.index.json").read_text())
    files = sorted(new.glob("model-*-of-*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    written: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        biggest = max(t.numel() * t.element_size() for t in part.values())
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 300_000, f
        assert biggest <= 300_000 or len(part) == 1, f  # a tensor over the limit gets a file of its own
        assert not written.keys() & part.keys()
        written |= part
        assert {k: f.name for k in part} == {k: index["weight_map"][k] for k in part}
    before = load_file(old / "model.safetensors")
    assert written.keys() == before.keys() and "lm_head.weight" not in written
    for name, t in before.items():
        assert written[name].dtype == t.dtype and torch.equal(written[name], t), name
    assert json.loads((new / "config.json").read_text()) == json.loads((old / "config.json").read_text())
    assert (new / "openft.json").exists() and (new / "tokenizer_config.json").exists()

    pretrained = pretrained_model.state_dict()
    store = LocalBlobStore(tmp_path / "blobs", dir_cache=tmp_path / "cache")
    fetched = store.materialize_dir(store.put_dir(new))
    for f in new.iterdir():
        assert (fetched / f.name).read_bytes() == f.read_bytes(), f.name
    served = load_model(cfg.base_model, fetched, device="cpu")[0].state_dict()
    assert served.keys() == pretrained.keys()
    for name, t in pretrained.items():
        assert torch.equal(served[name], t), name
