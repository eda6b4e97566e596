"""openft's training loop vs. TRL's SFTTrainer on one GPU, in one command: ``python bench/gpu_throughput.py``.

Offline: both models are built here with random weights from published shapes (no download).

- ``vlm``: a Qwen2-VL-2B-sized model (``train_throughput.build_qwen2_vl_2b``) on 448-px
  coloured-shape pictures with a question and a short answer;
- ``text``: a Qwen2-1.5B-sized text model (Qwen2-VL-2B's language model, 1.5 B parameters) on
  text prompts of varied length (64-1,024 tokens) with a short answer, where padding matters.

Every variant runs in its own process on the same data: openft (``recipes.sft.run``) and TRL
(``SFTTrainer``, prompt/completion rows, loss on the completion), LoRA (r=16 on the language
model's projections) and full fine-tuning (vision encoder frozen), packing on and off (openft's
``TrainConfig.packing``; TRL's ``padding_free``). Image batches cannot be packed (Qwen2-VL's M-RoPE
positions are per example: openft pads them, TRL's padding-free collator has no image support),
so the VLM runs with packing off only. bf16 autocast on CUDA for both; no gradient checkpointing
(the memory fits); the attention kernel both use is printed.

As in ``train_throughput.py`` (``harness``): both clocks start once the model is loaded, so data
preparation counts on both sides (openft's render, TRL's dataset tokenization and collation);
TRL gets openft's learning-rate schedule and does not train the ``\n`` after ``<|im_end|>``.

Printed per variant: examples/s and tokens/s over preparation + all steps (tokens are real
tokens, image tokens included, padding excluded), preparation seconds, the steady step time
(without the first ``--warmup-steps``), MFU = model FLOPs / the device's *measured* peak (a bf16
matmul loop on CUDA, fp32 on CPU; or ``--peak-tflops``) over the same span and over the steady
steps, peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS growth), and openft/TRL ratios. Model FLOPs per token = 6 x N (full) or 4 x N (LoRA: no weight gradients for
the frozen base), N = parameters without the input embedding; attention's sequence-squared term
and the vision encoder's patch count are left out, the same for both sides.

On a GPU (``--size auto`` picks ``full`` there) the default run is sized for an H100/H200 class
device within ``--budget-s`` (480 s): a variant that would not finish in the time left (judged by
the slowest so far) is skipped and listed. On CPU it runs a reduced size (``tiny``:
``openft-tiny-vlm`` and a 2-layer text model) so the script itself is exercised.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    END_OF_TURN,
    REPO,
    TimingReporter,
    counting_trainer,
    import_both_stacks,
    measure,
    openft_config,
    trl_args,
    trl_step_timer,
    trl_trainable,
    untrain_after_end_of_turn,
)
from train_throughput import QWEN2_VL_2B_TEXT, build_qwen2_vl_2b, make_data

FILLER = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
)
TINY_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
TINY_TEXT_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}


# --- models and data -------------------------------------------------------------------------


def build_models(size: str, root: Path) -> dict[str, Path]:
    """``{"vlm": folder, "text": folder}``: tiny ones, or 2B / 1.5B-sized ones with random weights."""
    sys.path.insert(0, str(REPO / "src"))
    from openft.models.tiny import ensure_tiny_vlm

    tiny = ensure_tiny_vlm(root)
    vlm = tiny if size == "tiny" else build_qwen2_vl_2b(tiny, root / "qwen2-vl-2b-random")
    return {"vlm": vlm, "text": build_text_model(tiny, root / f"text-{size}", size)}


def build_text_model(tiny: Path, out: Path, size: str) -> Path:
    """A Qwen2 causal LM (Qwen2-VL-2B's language model shape at ``full``) with the tiny tokenizer
    and its chat template (the tokenizer's ids fit inside any vocabulary)."""
    import torch
    from transformers import AutoProcessor, Qwen2Config, Qwen2ForCausalLM

    processor = AutoProcessor.from_pretrained(tiny)
    tok = processor.tokenizer
    tok.chat_template = processor.chat_template
    shape = {k: v for k, v in QWEN2_VL_2B_TEXT.items() if k != "rope_parameters"}
    if size == "tiny":
        shape |= {**TINY_TEXT, **TINY_TEXT_HEADS, "vocab_size": len(tok)}
    special = {"bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "pad_token_id": tok.pad_token_id}
    config = Qwen2Config(
        **shape,
        **special,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    t = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # A tokenizer-only folder: without this field AutoProcessor gives the tokenizer, not the VLM's processor.
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(json.dumps(json.loads(tok_config.read_text()) | {"processor_class": None}))
    n = sum(p.numel() for p in model.parameters())
    print(
        f"built random Qwen2 text model: {n / 1e6:,.1f} M parameters in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return out


def make_text_data(n: int, max_words: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer): a colour word hidden in 1/16 to all of ``max_words`` filler words."""
    rng = random.Random(seed)
    colours = ("red", "green", "blue", "yellow", "black", "white")
    out = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(max_words // 16, max_words))]
        colour = rng.choice(colours)
        words.insert(rng.randrange(len(words) + 1), colour)
        out.append((" ".join(words) + "? Which colour?", f"The colour is {colour}."))
    return out


def make_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run's data as plain rows: ``prompt``, ``answer`` and, for the VLM, ``png``."""
    n = args.batch_size * args.steps
    if args.model == "vlm":
        return [
            {"png": png, "prompt": p, "answer": a} for png, p, a in make_data(n, args.image_size, args.seed)
        ]
    return [{"prompt": p, "answer": a} for p, a in make_text_data(n, args.max_words, args.seed)]


# --- children --------------------------------------------------------------------------------


def attention(device: str) -> str:
    import importlib.util

    return (
        "flash_attention_2"
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn")
        else "sdpa"
    )


def run_openft(args: argparse.Namespace, mode: str, packing: bool, rows: list[dict]) -> dict:
    import openft.training.setup as setup
    from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
    from openft.training.recipes import sft

    def user(row: dict) -> Message:
        text = TextPart(text=row["prompt"])
        if "png" not in row:
            return Message(role="user", content=(text,))
        url = "data:image/png;base64," + base64.b64encode(row["png"]).decode()
        return Message(role="user", content=(ImagePart(url=url, data=row["png"]), text))

    examples = [
        ChatExample(
            line=i + 1,
            messages=(user(r), Message(role="assistant", content=(TextPart(text=r["answer"]),), weight=1)),
        )
        for i, r in enumerate(rows)
    ]
    counted: dict[str, int] = {}
    build = setup._build_model

    def counting(*a: Any, **k: Any) -> Any:
        model, processor = build(*a, **k)
        counted["params"] = _flop_params(model)
        return model, processor

    setup._build_model = counting
    with tempfile.TemporaryDirectory() as out:
        cfg = openft_config(
            out,
            args,
            mode,
            n_epochs=1,
            max_length=4096,
            gradient_checkpointing=False,
            packing=packing,
            attn_implementation=attention(args.device),
            loss_kernel=args.loss_kernel,
        )

        class Reporter(TimingReporter):
            def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
                if once == "loss-kernel":  # which loss ran, and why (setup's choice)
                    counted["loss_kernel"] = message

        rep = Reporter()
        rep.watch_model()  # counts trainable parameters; its clock starts once the model is loaded
        sft.run(cfg, examples, rep)
    tokens = [b - a for a, b in zip([0, *rep.cum_tokens], rep.cum_tokens, strict=False)]
    return {
        "prep_s": rep.prep_s,
        "step_s": rep.step_s,
        "step_tokens": tokens,
        "losses": rep.losses,
        "trainable": rep.trainable,
        **counted,
    }


def run_trl(args: argparse.Namespace, mode: str, packing: bool, rows: list[dict]) -> dict:
    import io

    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    vlm = args.model == "vlm"
    cuda = args.device.startswith("cuda")
    # Like openft: LoRA's frozen base in bf16 on CUDA, fp32 master weights for full fine-tuning.
    dtype = torch.bfloat16 if cuda and mode == "lora" else torch.float32
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = auto.from_pretrained(args.model_dir, dtype=dtype, attn_implementation=attention(args.device))
    timer = trl_step_timer()
    timer.begin()  # like openft's clock: from the loaded model, so TRL's dataset preparation counts
    processing = (AutoProcessor if vlm else AutoTokenizer).from_pretrained(args.model_dir)
    data = []
    for r in rows:
        row = {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["answer"]}],
        }
        if vlm:
            row["images"] = [Image.open(io.BytesIO(r["png"])).convert("RGB")]
        data.append(row)
    peft_config = trl_trainable(model, mode)  # openft's default: the vision encoder stays frozen

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            **trl_args(
                out,
                args,
                num_train_epochs=1,
                bf16=cuda,
                use_cpu=not cuda,
                padding_free=packing,
                gradient_checkpointing=False,
            )
        )
        trainer = counting_trainer(SFTTrainer)(
            model=model,
            args=cfg,
            train_dataset=Dataset.from_list(data),
            processing_class=processing,
            peft_config=peft_config,
            callbacks=[timer],
        )
        # openft trains a reply up to <|im_end|>; TRL would also train the "\n" after it.
        tokenizer = getattr(processing, "tokenizer", processing)
        end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        trainer.data_collator = untrain_after_end_of_turn(trainer.data_collator, end_id, "labels")
        params = _flop_params(trainer.model)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return {
        "prep_s": timer.prep_s,
        "step_s": timer.step_s,
        "step_tokens": trainer.step_tokens,
        "losses": trainer.losses,
        "params": params,
        "trainable": trainable,
    }


def _flop_params(model: Any) -> int:
    """Parameters a token's FLOPs scale with: all but the input embedding (a tied one counts once,
    as the output projection)."""
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embed.numel())


def child(args: argparse.Namespace) -> None:
    impl, mode, packing = args.child.split(":")
    import_both_stacks("sft")
    import torch

    torch.manual_seed(args.seed)
    rows = make_rows(args)
    run = run_openft if impl == "openft" else run_trl
    res = measure(lambda: run(args, mode, packing == "packed", rows), cuda=args.device.startswith("cuda"))
    Path(args.json_out).write_text(json.dumps(res))


# --- parent ----------------------------------------------------------------------------------


def measured_peak_tflops(device: str) -> float:
    """What a large matmul loop reaches: bf16 on CUDA, fp32 on CPU (the MFU denominator)."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def summarise(
    res: dict, args: argparse.Namespace, *, model: str, impl: str, mode: str, packing: bool
) -> dict:
    # Rates over preparation (openft's render, TRL's dataset tokenization) plus every step, as
    # train_throughput does; the steady step time and MFU leave the first --warmup-steps out.
    total = res["prep_s"] + sum(res["step_s"])
    tokens_per_s = sum(res["step_tokens"]) / total
    w = min(args.warmup_steps, max(0, len(res["step_s"]) - 1))
    steady = res["step_s"][w:]
    steady_tokens_per_s = sum(res["step_tokens"][w : len(res["step_s"])]) / sum(steady)
    k = 6 if mode == "full" else 4
    return {
        "model": model,
        "impl": impl,
        "mode": mode,
        "packing": "on" if packing else "off",
        "steps": len(res["step_s"]),
        "examples_per_s": args.batch_size * args.steps / total,
        "tokens_per_s": tokens_per_s,
        "prep_s": res["prep_s"],
        "step_ms": 1000 * sum(steady) / len(steady),
        "mfu": k * res["params"] * tokens_per_s / (args.peak_tflops * 1e12),
        "steady_mfu": k * res["params"] * steady_tokens_per_s / (args.peak_tflops * 1e12),
        "peak_mem_gib": res.get("cuda_peak_bytes", res["peak_rss_bytes"]) / 2**30,
        "loss": f"{res['losses'][0]:.2f}->{res['losses'][-1]:.2f}",
        "wall_s": res["wall_s"],
        "loss_kernel": res.get("loss_kernel", ""),
    }


def variants(args: argparse.Namespace) -> list[tuple[str, str, bool, str]]:
    out = []
    for model in args.models:
        for mode in args.modes:
            for packing in (False, True) if model == "text" else (False,):
                out += [(model, mode, packing, impl) for impl in args.impls]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    ap.add_argument(
        "--size", choices=("auto", "tiny", "full"), default="auto", help="auto: full on CUDA, tiny on CPU"
    )
    ap.add_argument("--models", nargs="+", choices=("vlm", "text"), default=["vlm", "text"])
    ap.add_argument("--modes", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    ap.add_argument("--impls", nargs="+", choices=("openft", "trl"), default=["openft", "trl"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per variant; default 12 (full) / 8 (tiny)"
    )
    ap.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the averages")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--image-size", type=int, default=None, help="default 448 (full) / 112 (tiny)")
    ap.add_argument(
        "--max-words", type=int, default=None, help="longest text prompt in words; default 1000 / 120"
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator; default: measured here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--loss-kernel",
        choices=("auto", "chunked", "plain", "liger"),
        default="auto",
        help="openft's TrainConfig.loss_kernel (auto: Liger on CUDA when installed, else chunked)",
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip variants that would end past this")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    started = time.perf_counter()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size if args.size != "auto" else ("full" if args.device.startswith("cuda") else "tiny")
    full = size == "full"
    args.steps = args.steps or (12 if full else 8)
    args.image_size = args.image_size or (448 if full else 112)
    args.max_words = args.max_words or (1000 if full else 120)
    if args.peak_tflops is None:
        args.peak_tflops = measured_peak_tflops(args.device)
    results, skipped, slowest = [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="openft-gpu-tp-") as tmp:
        dirs = build_models(size, Path(tmp))
        for model, mode, packing, impl in variants(args):
            name = f"{model} {impl} {mode} packing {'on' if packing else 'off'}"
            if time.perf_counter() - started + slowest > args.budget_s:
                skipped.append(name)
                continue
            t0 = time.perf_counter()
            out = Path(tmp) / "result.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--child", f"{impl}:{mode}:{'packed' if packing else 'padded'}"]
            cmd += ["--model", model, "--model-dir", str(dirs[model]), "--json-out", str(out)]
            cmd += _passthrough(args)
            print(f"running {name} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            slowest = max(slowest, time.perf_counter() - t0)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
                print(f"  FAILED ({name}):\n{tail}", flush=True)
                continue
            res = json.loads(out.read_text())
            results.append(summarise(res, args, model=model, impl=impl, mode=mode, packing=packing))
    print_table(results, args, size, time.perf_counter() - started)
    if skipped:
        print(f"skipped to stay within --budget-s {args.budget_s:.0f}: " + "; ".join(skipped))


def print_table(results: list[dict], args: argparse.Namespace, size: str, elapsed: float) -> None:
    import torch

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(
        f"\nSFT throughput, openft vs TRL {_version('trl')}: size={size}, device={dev}, torch {torch.__version__}, "
        f"transformers {_version('transformers')}, attention {attention(args.device)}, batch {args.batch_size}, "
        f"{args.steps} steps per variant (rates over data preparation + all steps; step ms and steady MFU "
        f"leave out the first {args.warmup_steps}), "
        f"{'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, peak {args.peak_tflops:.3g} TFLOP/s "
        f"({'given' if '--peak-tflops' in sys.argv else 'measured'}), load average {os.getloadavg()[0]:.2f}"
    )
    columns = [  # (result key, heading, width, format)
        ("model", "model", 5, "{:<5}"),
        ("impl", "impl", 7, "{:<7}"),
        ("mode", "mode", 5, "{:<5}"),
        ("packing", "packing", 7, "{:<7}"),
        ("examples_per_s", "examples/s", 10, "{:>10.2f}"),
        ("tokens_per_s", "tokens/s", 10, "{:>10.0f}"),
        ("prep_s", "prep s", 7, "{:>7.2f}"),
        ("step_ms", "step ms", 9, "{:>9.1f}"),
        ("mfu", "MFU", 7, "{:>7.2%}"),
        ("steady_mfu", "steady MFU", 10, "{:>10.2%}"),
        ("peak_mem_gib", "peak GiB", 9, "{:>9.2f}"),
        ("loss", "loss", 12, "{:>12}"),
    ]
    print(" ".join(h.ljust(w) if i < 4 else h.rjust(w) for i, (_, h, w, _) in enumerate(columns)))
    for r in results:
        print(" ".join(f.format(r[k]) for k, _, _, f in columns))
    print("\nopenft / TRL (same model, mode and packing):")
    by = {(r["model"], r["mode"], r["packing"], r["impl"]): r for r in results}
    for (model, mode, packing, impl), o in by.items():
        t = by.get((model, mode, packing, "trl"))
        if impl == "openft" and t:
            print(
                f"  {model:<5} {mode:<5} packing {packing:<3}: examples/s x{o['examples_per_s'] / t['examples_per_s']:.2f}, "
                f"MFU {o['mfu']:.1%} vs {t['mfu']:.1%}, peak memory x{o['peak_mem_gib'] / t['peak_mem_gib']:.2f}"
            )
    for kernel in sorted({r["loss_kernel"] for r in results if r["loss_kernel"]}):
        print(f"openft {kernel}")
    mem = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(
        f"peak memory = {mem}; tokens exclude padding, include image tokens; MFU = (6 full | 4 LoRA) x params "
        f"(no input embedding) x tokens/s / peak. Whole run: {elapsed:.0f} s"
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--device", args.device,
        "--batch-size", str(args.batch_size),
        "--steps", str(args.steps),
        "--lr", str(args.lr),
        "--image-size", str(args.image_size),
        "--max-words", str(args.max_words),
        "--seed", str(args.seed),
        "--loss-kernel", args.loss_kernel,
    ]  # fmt: skip


if __name__ == "__main__":
    main()
