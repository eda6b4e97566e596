"""The built-in offline base model ``openft-tiny-vlm``: a tiny, randomly initialised Qwen2-VL.

Every test and demo needs a vision-language model without a model hub, so we generate one:
transformers' real ``Qwen2VLForConditionalGeneration`` (~0.8 M parameters) with a byte-level BPE
tokenizer trained here on a fixed corpus, a hand-written Qwen-style chat template and the
Qwen2-VL image processor with small pixel limits. Generation is deterministic (fixed seeds, fixed
corpus) so two machines building it get identical files.

Two gotchas shape this module (see ``shared/notes/offline-vlm-facts.md``):

- Without torchvision, ``Qwen2VLProcessor`` cannot be constructed (its video-processor check
  fails) and cannot be saved with ``video_processor=None``. :class:`TinyVLProcessor` is the same
  processor with the video half removed; it is registered with ``AutoProcessor`` when this module
  is imported, so ``AutoProcessor.from_pretrained(path)`` finds it by name.
- The vision merger outputs the *text* hidden size, and M-RoPE's ``mrope_section`` must sum to
  ``head_dim / 2``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from openft.settings import TINY_MODEL

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # end of turn = eos
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VOCAB_SIZE = 2048
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64
_SEED = 1234
_FORMAT_VERSION = "3"  # bump when the generated files change; becomes part of the folder check

# Qwen-style template. Content may be a string or a list of {"type": "text"|"image"} parts;
# tools and tool calls follow Qwen2.5's <tools>/<tool_call> convention.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}"
    "{% if messages[0].content is string %}{{ messages[0].content }}"
    "{% else %}{% for part in messages[0].content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}"
    "{% endif %}\n\n"
    "{% endif %}"
    "# Tools\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% elif message.content %}"
    "{% for part in message.content %}"
    "{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message.tool_calls %}"
    "{% for call in message.tool_calls %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": '
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyVLProcessor(ProcessorMixin):
    """Qwen2-VL's processor without the video half (which needs torchvision to construct)."""

    return_mm_token_type_ids = True

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        # Same rule as Qwen2VLProcessor: one placeholder per merged 2x2 patch group.
        merge_length = self.image_processor.merge_size**2
        num_image_tokens = image_inputs["image_grid_thw"][image_idx].prod() // merge_length
        return self.image_token * int(num_image_tokens)

    @property
    def model_input_names(self):
        return super().model_input_names + ["mm_token_type_ids"]


class _TinyVLProcessorConfig(PretrainedConfig):
    """Only a registration key: lets ``AutoProcessor`` resolve ``TinyVLProcessor`` by name."""

    model_type = "openft_tiny_vl"


AutoProcessor.register(_TinyVLProcessorConfig, TinyVLProcessor, exist_ok=True)


def ensure_tiny_vlm(cache_dir: Path) -> Path:
    """Return ``cache_dir/openft-tiny-vlm``, generating it first if it does not exist.

    Safe under concurrency: the model is built in a temporary sibling folder and renamed into
    place atomically; a process that loses the race discards its copy and uses the winner's.
    """
    return build_once(Path(cache_dir) / TINY_MODEL, _build, version=_FORMAT_VERSION)


def build_once(target: Path, build: Callable[[Path], None], *, version: str) -> Path:
    """``target``, built first by ``build(folder)`` unless it holds a complete build of ``version``
    (its ``openft-tiny.json`` marker, the last file ``build`` writes, says which). Built in a
    temporary sibling and renamed into place atomically, so concurrent builders never see a
    half-written folder; a build of another version is moved aside and replaced."""
    if _is_current(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists() and not _is_current(target, version):
            # Built by an older openft: move it aside (atomic), so the rename below can succeed.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
            try:
                os.rename(target, stale / target.name)
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)  # atomic on POSIX; fails if another process won the race
        except OSError:
            if not _is_current(target, version):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(target: Path, version: str) -> bool:
    """The folder exists, complete, and was generated by this version of its builder."""
    try:
        return json.loads((target / "openft-tiny.json").read_text()).get("format_version") == version
    except (OSError, ValueError):
        return False


def _build(out: Path) -> None:
    tokenizer = _build_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = TinyVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=qwen_text_config(
            VOCAB_SIZE, ids, {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
        ),
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,  # the merger projects into the text hidden size
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = Qwen2VLForConditionalGeneration(config)
        _edge_filters(model.model.visual.patch_embed.proj.weight)
    save_tiny(
        model, processor, out, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"], bos=ids["<|endoftext|>"]
    )
    (out / "openft-tiny.json").write_text(json.dumps({"name": TINY_MODEL, "format_version": _FORMAT_VERSION}))


def qwen_text_config(vocab: int, ids: dict[str, int], rope: dict[str, Any]) -> dict[str, Any]:
    """The tiny Qwen-VL text stack (this model's, and the tests' Qwen2.5-VL and Qwen3-VL ones):
    ``ids`` names the ChatML special tokens' ids, ``rope`` is the family's M-RoPE."""
    return {
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": rope,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def save_tiny(
    model: PreTrainedModel, processor: ProcessorMixin, out: Path, *, eos: int | list[int], pad: int, bos: int
) -> Path:
    """Write a tiny model and its processor to ``out``; generation stops at ``eos`` (a random
    model's own config would not say which token ends a turn)."""
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _edge_filters(weight: torch.Tensor) -> None:
    """Give the patch embedding fixed colour and oriented-edge filters, like a CNN's first layer.

    With random filters the tower passes on colour (a patch's mean survives any projection) but
    hardly shape, and the vision tower stays frozen by default, so shape was never learned (a
    circle and a square of one colour looked alike). Here, per 14x14 patch: the mean of each
    colour channel, and luminance gradients in four orientations over the whole patch and over
    each quadrant; the remaining channels stay random. Each filter has a random one's norm.
    """
    out, channels, frames, size, _ = weight.shape
    ys, xs = torch.meshgrid(
        torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij"
    )
    orientations = (xs, ys, xs + ys, xs - ys)  # vertical, horizontal and both diagonal edges
    half = size // 2
    regions = [(slice(None), slice(None))] + [
        (slice(r, r + half), slice(c, c + half)) for r in (0, half) for c in (0, half)
    ]
    filters = []
    for c in range(channels):  # colour: the patch mean of one channel
        f = torch.zeros(channels, size, size)
        f[c] = 1.0
        filters.append(f)
    for rows, cols in regions:
        for grad in orientations:
            g = torch.zeros(size, size)
            g[rows, cols] = torch.sign(grad[rows, cols] - grad[rows, cols].mean())
            filters.append(g.expand(channels, size, size) / channels)  # on luminance
    norm = weight.flatten(1).norm(dim=1).mean()
    with torch.no_grad():
        for i, f in enumerate(filters[:out]):
            f = f.unsqueeze(1).expand(channels, frames, size, size)
            weight[i] = f / f.norm() * norm


def _build_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer(
        SPECIAL_TOKENS, vocab_size=VOCAB_SIZE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def build_bpe_tokenizer(
    special_tokens: tuple[str, ...],
    *,
    vocab_size: int,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    plain_added_tokens: tuple[str, ...] = (),
    model_max_length: int = 4096,
    unk_token: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on :func:`_corpus` (deterministic, no files, no network).

    ``special_tokens`` are added as special (never produced from user text);
    ``plain_added_tokens`` are added as non-special tokens (Qwen's ``<tool_call>``, ``<think>``:
    real checkpoints ship them that way so assistant text may contain them).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Qwen's regex split (words, digits one by one, punctuation, whitespace), then byte level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if plain_added_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        bos_token=bos_token,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}),
    )


_QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _corpus() -> list[str]:
    """A fixed, generated English-ish corpus: enough for a 2k-token BPE; no files, no network."""
    import random

    words = (
        "the a an of to and in is it you that he was for on are with as I his they be at one have this "
        "from or had by hot word but what some we can out other were all there when up use your how said "
        "each she which do their time if will way about many then them write would like so these her long "
        "make thing see him two has look more day could go come did number sound no most people my over "
        "know water than call first who may down side been now find any new work part take get place made "
        "live where after back little only round man year came show every good me give our under name very "
        "through just form sentence great think say help low line differ turn cause much mean before move "
        "right boy old too same tell does set three want air well also play small end put home read hand "
        "port large spell add even land here must big high such follow act why ask men change went light "
        "kind off need house picture try us again animal point mother world near build self earth father "
        "red green blue yellow black white orange purple brown pink grey colour color shape circle square "
        "triangle star image photo answer question user assistant system tool function call yes no true false "
        "what is the capital country city river mountain ocean cat dog bird fish tree flower car boat plane "
        "zero one two three four five six seven eight nine ten hello thanks please sorry okay json name "
        "arguments type text image url content role message weight"
    ).split()
    rng = random.Random(_SEED)
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 14)
        sent = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.5:
            sent = sent.capitalize()
        sent += rng.choice([".", "?", "!", ",", ":", ""])
        if rng.random() < 0.2:
            sent += " " + str(rng.randint(0, 9999))
        lines.append(sent)
    lines.append('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 \n\t")
    return lines
