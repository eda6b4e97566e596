"""A tiny random SmolVLM2 (SigLIP-style vision tower + pixel-shuffle connector + Llama decoder)
built offline, for proving that the Idefics3 / SmolVLM family goes through the same code path as
Qwen2-VL and LLaVA.

What is real: the architecture (``SmolVLMForConditionalGeneration``), the processor class
(``SmolVLMProcessor`` with the PIL ``SmolVLMImageProcessorPil``: resize the longest edge to
``size``, split into ``max_image_size`` tiles plus one global image, ``pixel_attention_mask``), the
special tokens and their roles (checked against HuggingFaceTB/SmolVLM2-2.2B-Instruct and
-500M-Video-Instruct: ``<|endoftext|>`` unk, ``<|im_start|>`` bos, ``<|im_end|>`` pad,
``<end_of_utterance>`` eos / end of turn, ``<fake_token_around_image>``, ``<image>``,
``<global-img>``, ``<row_R_col_C>`` for R, C in 1..6), and the chat template (the published
SmolVLM2 one, as transformers 5.24 ships it in ``processing_smolvlm.DEFAULT_CHAT_TEMPLATE``: its
string-content branch included). What is scaled down: a byte-level BPE trained here (vocab 1024,
so ids differ from the real 49,280), 32 px tiles of 8 px patches with a pixel-shuffle factor of
2 (4 image tokens per tile; the real model: 512 px, 16 px, factor 4, 64 tokens), and at most 2x2
tiles (``size`` 64; the real one: 2048, 4x4). The 88 ``<|reserved_special_token_N|>`` are left
out. Deterministic: the same files on every machine, in about a second.

``build_tiny_idefics3`` writes the same model as an Idefics3 (``Idefics3ForConditionalGeneration``,
``Idefics3Processor``, Llama 3's ``<|begin_of_text|>``; template checked against
HuggingFaceM4/Idefics3-8B-Llama3 as quoted by its users' code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

from openft.models.loader import image_only_processor
from openft.models.tiny import build_bpe_tokenizer, save_tiny
from tests.unit.models.tiny_llava import llama_text_config

GRID = 6
"""``<row_R_col_C>`` tokens for R, C in 1..6, as in the published tokenizer."""
SPECIAL_TOKENS = (
    "<|endoftext|>",  # unk
    "<|im_start|>",  # bos; the template opens every conversation with it
    "<|im_end|>",  # pad
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1)),
    "<end_of_utterance>",  # eos: closes every turn
)
VOCAB_SIZE = 1024
TILE = 32
"""``max_image_size``: the vision tower's input (one tile, and the global image)."""
PATCH_SIZE = 8
SCALE_FACTOR = 2
TOKENS_PER_TILE = (TILE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
MAX_SIDE = 2 * TILE
"""``size``: the longest edge an image is resized to before splitting (so at most 2x2 tiles)."""
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE


def build_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=VOCAB_SIZE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )


def build_processor() -> SmolVLMProcessor:
    """The processor as a SmolVLM2 checkpoint has it, minus the video processor (it cannot be built
    without torchvision); it saves as ``SmolVLMProcessor``."""
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": MAX_SIDE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=1,
    )
    return image_only_processor(SmolVLMProcessor)(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_smolvlm(out: Path) -> Path:
    """Write a tiny SmolVLM2 (model + processor) to ``out`` and return it."""
    processor = build_processor()
    model, ids = _model(
        SmolVLMConfig,
        SmolVLMVisionConfig,
        SmolVLMForConditionalGeneration,
        processor.tokenizer,
        "<|im_start|>",
    )
    save_tiny(model, processor, out, **ids)
    # A real checkpoint also has the video processor's config: loading must not need it for images.
    SmolVLMVideoProcessor().save_pretrained(out)
    return out


IDEFICS3_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace("<|im_start|>", "<|begin_of_text|>", 1)
"""Idefics3-8B-Llama3's template: SmolVLM's (without the video and string-content branches, which
render nothing here) opened by Llama 3's ``<|begin_of_text|>``."""


def build_tiny_idefics3(out: Path) -> Path:
    """Write a tiny Idefics3 (``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``, which
    has no video half) to ``out``: the same code path as SmolVLM, other classes and bos token."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_bpe_tokenizer(
        ("<|begin_of_text|>", "<|end_of_text|>", *SPECIAL_TOKENS[3:]),
        vocab_size=VOCAB_SIZE,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
        model_max_length=2048,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": MAX_SIDE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    model, ids = _model(
        Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, tokenizer, "<|begin_of_text|>"
    )
    return save_tiny(model, processor, out, **ids)


def _model(
    config_cls: Any, vision_cls: Any, model_cls: Any, tok: Any, bos: str
) -> tuple[Any, dict[str, int]]:
    """The random model and its generation ids (``save_tiny``'s ``eos``, ``pad``, ``bos``)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in (bos, "<end_of_utterance>", "<image>")}
    pad = tok.pad_token_id
    config = config_cls(
        vision_config=vision_cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TILE,
            patch_size=PATCH_SIZE,
        ),
        text_config=llama_text_config(vocab=VOCAB_SIZE, bos=ids[bos], eos=ids["<end_of_utterance>"], pad=pad),
        image_token_id=ids["<image>"],
        scale_factor=SCALE_FACTOR,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2468)
        model = model_cls(config)
    return model, {"eos": ids["<end_of_utterance>"], "pad": pad, "bos": ids[bos]}
