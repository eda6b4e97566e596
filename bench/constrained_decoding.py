"""Cost of constrained decoding: chat tokens/s with and without a grammar, side by side in one run.

    .venv/bin/python bench/constrained_decoding.py [--runs 3] [--requests 6] [--max-tokens 128]
    .venv/bin/python bench/constrained_decoding.py --engines [--vocab 32000]

Default mode: the built-in ``openft-tiny-vlm`` (random weights, CPU) answers through
``inference.chat.create_completion`` (the same path as ``POST /v1/chat/completions``) in three
variants: free decoding, ``response_format`` strict ``json_schema``, ``tool_choice:
"required"`` with two tools, and ``tool_choice: "auto"`` with a strict tool (the lazy grammar). Runs are interleaved (free, schema, tools, free, ...) so machine noise
hits every variant alike; each run is ``--requests`` requests at temperature 1 with different
seeds, and its figure is completion tokens / wall time. min / median / max over runs, plus the
load average before and after, are printed.

``--engines``: the grammar engines compared when choosing one (llguidance, xgrammar,
outlines-core; the last two only if importable), on the tiny tokenizer or a synthetic byte-level
BPE of ``--vocab`` tokens: tokenizer setup, schema compile, mean time to compute one token mask
along a constrained random walk, and whether a keyword the engine cannot enforce is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA, "strict": True}},
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
UNSUPPORTED = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def chat_bench(args: argparse.Namespace) -> None:
    from openft.datasets.images import load_image_url
    from openft.inference.chat import create_completion
    from openft.inference.registry import ModelRef, Registry
    from openft.models.tiny import ensure_tiny_vlm
    from openft.protocol.chat import ChatCompletionRequest
    from openft.settings import TINY_MODEL

    base = ensure_tiny_vlm(ROOT / ".openft" / "test-models")
    loaded = Registry(device="cpu", max_loaded=1).get(
        ModelRef(id=TINY_MODEL, base=str(base), weights_dir=None)
    )
    ask = [{"role": "user", "content": "Weather in Paris for three days, please."}]
    variants: dict[str, dict[str, Any]] = {
        "free": {},
        "json_schema": {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
            }
        },
        "tool_required": {"tools": TOOLS, "tool_choice": "required"},
        # A strict tool under "auto": the lazy grammar (free text or schema-true calls) masks
        # every token, text included.
        "tool_auto_strict": {"tools": TOOLS, "tool_choice": "auto"},
    }

    def one_run(extra: dict[str, Any], run: int) -> tuple[float, int]:
        tokens, start = 0, time.perf_counter()
        for i in range(args.requests):
            req = ChatCompletionRequest.model_validate(
                {
                    "model": TINY_MODEL,
                    "messages": ask,
                    "temperature": 1,
                    "seed": run * 1000 + i,
                    "max_completion_tokens": args.max_tokens,
                    **extra,
                }
            )
            tokens += create_completion(loaded, req, image_loader=load_image_url).usage.completion_tokens
        return tokens / (time.perf_counter() - start), tokens

    one_run(variants["json_schema"], -1)  # warm-up: tokenizer conversion, first grammar
    before = _load()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    counts: dict[str, int] = {k: 0 for k in variants}
    for run in range(args.runs):
        for name, extra in variants.items():
            rate, n = one_run(extra, run)
            rates[name].append(rate)
            counts[name] += n
    print(
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; load average before {before}, after {_load()}"
    )
    print(f"{'variant':<16} {'tokens':>7} {'tok/s min':>10} {'median':>8} {'max':>8}   vs free (median)")
    free = statistics.median(rates["free"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(
            f"{name:<16} {counts[name]:>7} {min(values):>10.1f} {med:>8.1f} {max(values):>8.1f}   {med / free:>6.2f}x"
        )


def _synthetic_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éüß{}[]":,. _-'
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(vocab * 2)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<|endoftext|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def engines_bench(args: argparse.Namespace) -> None:
    import torch

    if args.vocab:
        tokenizer = _synthetic_tokenizer(args.vocab)
    else:
        from transformers import AutoProcessor

        from openft.models.tiny import ensure_tiny_vlm

        tokenizer = AutoProcessor.from_pretrained(ensure_tiny_vlm(ROOT / ".openft" / "test-models")).tokenizer
    eos = tokenizer.eos_token_id
    n_vocab = len(tokenizer)
    print(f"tokenizer: {n_vocab} tokens; load average {_load()}")
    rows = []

    def walk(mask_fn: Any, unpack: Any, consume: Any, finished: Any, steps: int = 400) -> tuple[float, int]:
        """Mean seconds per engine mask call (unpacking to ids for the walk is not timed)."""
        rng = random.Random(0)
        spent, n = 0.0, 0
        while n < steps and not finished():
            t = time.perf_counter()
            raw = mask_fn()
            spent += time.perf_counter() - t
            allowed = unpack(raw)
            choices = [i for i in allowed if i != eos] or [eos]
            token = rng.choice(choices)
            consume(token)
            n += 1
            if token == eos:
                break
        return spent / max(n, 1), n

    # llguidance
    import llguidance
    import llguidance.hf

    t = time.perf_counter()
    llt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    m = llguidance.LLMatcher(llt, grammar)
    compile_s = time.perf_counter() - t
    shifts = torch.arange(32, dtype=torch.int32)

    def bits_to_ids(words: Any) -> list[int]:
        return ((words.unsqueeze(1) >> shifts) & 1).flatten()[:n_vocab].nonzero().flatten().tolist()

    per, n = walk(
        m.compute_bitmask,
        lambda raw: bits_to_ids(torch.frombuffer(bytearray(raw), dtype=torch.int32)),
        m.consume_token,
        m.is_stopped,
    )
    err, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_json_schema(UNSUPPORTED), llt
    )
    rows.append(
        (
            "llguidance " + llguidance.__version__,
            setup,
            compile_s,
            per,
            n,
            "; ".join(msgs) or "accepted silently",
        )
    )

    try:
        import xgrammar as xgr
    except ImportError as exc:
        rows.append(("xgrammar", None, None, None, 0, f"not importable: {exc}"))
    else:
        t = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=n_vocab)
        compiler = xgr.GrammarCompiler(info)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
        compile_s = time.perf_counter() - t
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

        per, n = walk(
            lambda: matcher.fill_next_token_bitmask(bitmask),
            lambda _: bits_to_ids(bitmask[0]),
            matcher.accept_token,
            matcher.is_terminated,
        )
        try:
            compiler.compile_json_schema(json.dumps(UNSUPPORTED))
            note = "accepted silently (if/then ignored)"
        except Exception as exc:  # noqa: BLE001 - reporting what the engine says
            note = str(exc)[:80]
        rows.append(("xgrammar " + getattr(xgr, "__version__", "?"), setup, compile_s, per, n, note))

    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as exc:
        rows.append(("outlines-core", None, None, None, 0, f"not importable: {exc}"))
    else:
        from openft.inference.engine import token_bytes

        t = time.perf_counter()
        mapping: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for i in range(n_vocab):
            if i not in special:
                mapping.setdefault(token_bytes(tokenizer, i), []).append(i)
        vocab = oc.Vocabulary(eos, mapping)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        try:
            index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab)
            guide = oc.Guide(index)
            compile_s = time.perf_counter() - t
            per, n = walk(guide.get_tokens, list, guide.advance, guide.is_finished)
        except Exception as exc:  # noqa: BLE001
            compile_s, per, n = time.perf_counter() - t, None, 0
            print(f"outlines-core failed on the schema: {exc}")
        try:
            build_regex_from_schema(json.dumps(UNSUPPORTED))
            note = "accepted silently (if/then ignored)"
        except Exception as exc:  # noqa: BLE001
            note = str(exc)[:80]
        rows.append(("outlines-core", setup, compile_s, per, n, note))

    print(
        f"{'engine':<22} {'setup s':>8} {'compile ms':>11} {'mask us/token':>14} {'tokens':>7}  unsupported 'if/then'"
    )
    for name, setup, comp, per, n, note in rows:
        fmt = lambda v, k: "-" if v is None else f"{v * k:.1f}"  # noqa: E731
        print(f"{name:<22} {fmt(setup, 1):>8} {fmt(comp, 1e3):>11} {fmt(per, 1e6):>14} {n:>7}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engines", action="store_true", help="compare grammar engines instead")
    parser.add_argument(
        "--vocab", type=int, default=0, help="--engines: synthetic vocabulary size (0: tiny model's)"
    )
    args = parser.parse_args()
    if args.engines:
        engines_bench(args)
    else:
        chat_bench(args)


if __name__ == "__main__":
    main()
