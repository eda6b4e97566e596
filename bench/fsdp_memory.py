"""Per-rank memory of full fine-tuning on 1 process vs N FSDP2 ranks (gloo on CPU, or CUDA), and
per-rank peak memory while loading the pretrained weights, saving the resumable state and writing
the epoch's servable checkpoint.

    python bench/fsdp_memory.py [--nproc 2] [--layers 12] [--hidden 768] [--vocab 8192] [--steps 2]
    python bench/fsdp_memory.py --io [--runs 3] [--nproc 2] [--file-mib 64]   # old vs new path

``--io``: the same model, saved once as a pretrained folder (safetensors), is loaded by N FSDP
ranks, trained one step, its resumable state saved and its servable checkpoint written, through
two paths, interleaved ``--runs`` times (old, new, old, new...), both with openft's own functions:
*old* is what openft did before: rank 0 reads the whole model and broadcasts each tensor, the
others build on the meta device (``distributed.shard``'s fallback, still used for ``.bin``
weights); the state is saved synchronously (``save_sharded_state`` without a writer); the
checkpoint gathers the full weights onto rank 0 (``distributed.full_state``) for
``save_pretrained``. *new* is openft's path today: every rank reads only its own slices of the
safetensors (``fsdp_io``); the state is copied and written in the background (``dcp.async_save``,
waited for before the next phase); the checkpoint is gathered and written a file of at most
``--file-mib`` at a time (``fsdp_io.save_servable``; openft's default is 1 GiB, more than this
model). Printed per rank and path: peak RSS above the RSS at the start of each phase (min /
median / max over the runs), the time the training thread is blocked by the state save (the
stall), and the load average.

A random-init Qwen2 text model (~98M parameters, ~390 MB of fp32 weights at the defaults, most of
them in decoder layers as in real LLMs, whose embeddings are a few percent of the weights; the
full training state, weights + gradients + AdamW's two moments, is 16 bytes per parameter) trains a
few AdamW steps on random tokens, launched by openft's own launcher (``distributed.launch``) and
sharded by openft's own ``distributed.shard`` (FSDP2 per decoder layer, then the root). Each rank
builds the model on the meta device and materialises only its shards (``to_empty`` after
``fully_shard``), so its memory is the sharded training state, not a full copy it then drops.

Printed per rank: the bytes of the tensors it holds after a step (local shards of weights, their
gradients and AdamW state: exact), its peak RSS above the RSS before the model was built (sampled
every 5 ms, so what FSDP gathers for a moment is in it), CUDA's peak allocation on GPUs, the mean
step time, and the machine's load average (on a shared CPU the times are noise; the bytes are not).

Why ``--malloc mmap`` (the default): FSDP allocates and frees a block-sized buffer for every gather
and gradient reduction. glibc serves such sizes from its heap once its dynamic mmap threshold has
grown, and keeps what is freed there, so with glibc's defaults a rank's RSS climbs above what it
holds (measured: +2.0 GiB per FSDP rank vs +1.7 GiB for one process at the default sizes, while the
tensors held halved). ``MALLOC_MMAP_THRESHOLD_=1048576`` (set for the ranks) maps every buffer of
1 MiB or more on its own and unmaps it when freed, so RSS follows live memory; ``--malloc default``
measures glibc's own behaviour. CUDA's caching allocator is unaffected either way.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """The highest RSS seen while active (a sampling thread: ``ru_maxrss`` cannot be reset)."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _local_bytes(t: Any) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def build_model(*, layers: int, hidden: int, vocab: int, device: Any, bf16: bool = False) -> Any:
    """A random-init Qwen2 (98M parameters at 12 x 768, vocab 8192), FSDP2-sharded by
    ``distributed.shard`` on several ranks: built on the meta device, each rank materialises only
    its shards (on one process, the whole model)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openft.training import distributed

    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    distributed.shard(model, device, vision_blocks=False, bf16=bf16)  # nothing to do on 1 rank
    model.to_empty(device=device)
    torch.manual_seed(distributed.rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02)
        for name, buf in model.named_buffers():  # rotary inverse frequencies
            if name.endswith("inv_freq"):
                dim = config.hidden_size // config.num_attention_heads
                buf.copy_(1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2) / dim)))
    return model


def train(
    *, layers: int, hidden: int, vocab: int, steps: int, seq: int, batch: int, reporter: Any
) -> dict[str, Any]:
    """One rank's run; returns every rank's figures (gathered on rank 0)."""
    import torch
    import torch.distributed as dist

    from openft.training import distributed

    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    base_rss = _rss()
    with _PeakRss() as rss:
        model = build_model(layers=layers, hidden=hidden, vocab=vocab, device=device, bf16=cuda)
        config = model.config
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            held = {
                "weights": sum(_local_bytes(p) for p in model.parameters()),
                "gradients": sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
                "optimizer": sum(
                    _local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0
                ),
            }
            optimizer.zero_grad(set_to_none=True)
    mine = {
        "rank": distributed.rank(),
        "n_params": n_params,
        "held": held,
        "peak_rss_above_start": rss.peak - base_rss,
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "step_s": sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0],
        "loss": float(loss.detach().float().item()),
    }
    everyone: list[Any] = [None] * distributed.world_size()
    if distributed.world_size() > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"ranks": everyone}


def load_and_save(
    *, folder: str, old: bool, out: str, file_bytes: int, reporter: Any
) -> list[dict[str, Any]]:
    """One rank's load, one step, one state save and one checkpoint, the ``old`` way or openft's
    (see the docstring); returns every rank's peak RSS of each phase and its save stall."""
    import torch
    import torch.distributed as dist

    from openft.models.loader import load_model
    from openft.training import distributed, fsdp_io
    from openft.training.async_save import StateWriter
    from openft.training.sharded_state import save_sharded_state

    device = torch.device("cpu")
    start = _rss()
    with _PeakRss() as load_rss:
        model, _ = load_model(folder, device="cpu", trainable=True, weights=old and distributed.is_main())
        assert old or fsdp_io.slices_cover(model, folder)
        distributed.shard(model, device, vision_blocks=False, bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    distributed.reshard(model)
    dist.barrier()
    before_save = _rss()
    with _PeakRss() as save_rss, StateWriter() as writer:
        t0 = time.perf_counter()
        save_sharded_state(
            Path(out) / "state",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            step=1,
            epoch=1,
            batch_in_epoch=1,
            rng_states={},
            writer=None if old else writer,
        )
        stall = time.perf_counter() - t0
        writer.wait()  # the background write's memory counts too
    dist.barrier()
    before_checkpoint = _rss()
    target = Path(out) / "checkpoint"
    with _PeakRss() as checkpoint_rss:
        if distributed.is_main():
            target.mkdir(parents=True)
        if old:
            weights = distributed.full_state(model)
            if distributed.is_main():
                model.save_pretrained(target, state_dict=weights)
            del weights
        else:
            assert fsdp_io.save_servable(model, target, max_file_bytes=file_bytes)
        dist.barrier()
    mine = {
        "rank": distributed.rank(),
        "load": load_rss.peak - start,
        "save": save_rss.peak - before_save,
        "stall": stall,
        "checkpoint": checkpoint_rss.peak - before_checkpoint,
        "files": len(list(target.glob("*.safetensors"))),
    }
    everyone: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def io_main(args: argparse.Namespace) -> None:
    import statistics
    import tempfile

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openft.training import distributed
    from openft.training.reporter import ListReporter

    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen2Config(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            vocab_size=args.vocab,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "base")
        del model
        print(
            f"--io: {n_params / 1e6:.0f}M parameters ({n_params * 4 / mib:.0f} MiB fp32 weights, "
            f"{n_params * 12 / mib:.0f} MiB weights + AdamW state) on {args.nproc} FSDP2 ranks (gloo, "
            f"1 torch thread each), {args.runs} interleaved runs; peak RSS above each phase's start"
        )
        figures: dict[str, list[list[dict[str, Any]]]] = {"old": [], "new": []}
        loads = []
        for run in range(args.runs):
            for path in ("old", "new"):
                fn = functools.partial(
                    load_and_save,
                    folder=str(Path(tmp) / "base"),
                    old=path == "old",
                    out=f"{tmp}/{path}{run}",
                    file_bytes=args.file_mib * mib,
                )
                figures[path].append(
                    distributed.launch(fn, ListReporter(), nproc=args.nproc, threads=1, max_restarts=0)
                )
                loads.append(os.getloadavg()[0])
        for path in ("old", "new"):
            for r in range(args.nproc):
                cells = []
                for phase in ("load", "save", "checkpoint"):
                    xs = sorted(run[r][phase] / mib for run in figures[path])
                    cells.append(f"{phase} +{xs[0]:.0f} / +{statistics.median(xs):.0f} / +{xs[-1]:.0f} MiB")
                stalls = sorted(run[r]["stall"] for run in figures[path])
                cells.append(
                    f"save stall {stalls[0]:.2f} / {statistics.median(stalls):.2f} / {stalls[-1]:.2f} s"
                )
                print(f"{path} rank {r}: " + "; ".join(cells) + " (min / median / max)")
            print(f"{path}: checkpoint in {figures[path][0][0]['files']} safetensors file(s)")
        print(f"load average (1 min) after each launch: {' '.join(f'{x:.2f}' for x in loads)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--malloc", choices=["mmap", "default"], default="mmap")
    parser.add_argument("--io", action="store_true", help="load and save memory, old vs new path")
    parser.add_argument("--runs", type=int, default=3, help="--io: interleaved runs of each path")
    parser.add_argument("--file-mib", type=int, default=64, help="--io: the new checkpoint's largest file")
    args = parser.parse_args()
    if args.malloc == "mmap":  # read by glibc when each spawned rank starts (see the docstring)
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    if args.io:
        io_main(args)
        return

    import torch

    from openft.training import distributed
    from openft.training.reporter import ListReporter

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.nproc
    mib = 2**20
    fn = functools.partial(
        train,
        layers=args.layers,
        hidden=args.hidden,
        vocab=args.vocab,
        steps=args.steps,
        seq=args.seq,
        batch=args.batch,
    )
    print(
        f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (gloo), 1 torch thread per rank'}; "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')}"
    )
    for nproc in (1, args.nproc):
        result = distributed.launch(fn, ListReporter(), nproc=nproc, threads=1, cuda=cuda, max_restarts=0)
        for r in result["ranks"]:
            held = r["held"]
            total = sum(held.values())
            print(
                f"nproc={nproc} rank {r['rank']}: {r['n_params'] / 1e6:.0f}M params; holds "
                f"{total / mib:.0f} MiB (weights {held['weights'] / mib:.0f}, gradients "
                f"{held['gradients'] / mib:.0f}, AdamW {held['optimizer'] / mib:.0f}); peak RSS "
                f"+{r['peak_rss_above_start'] / mib:.0f} MiB"
                + (f"; CUDA peak {r['cuda_peak'] / mib:.0f} MiB" if r["cuda_peak"] is not None else "")
                + f"; step {r['step_s']:.2f} s; loss {r['loss']:.3f}"
            )
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
