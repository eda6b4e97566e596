"""A tiny random LLaVA-1.5-style model (CLIP vision tower + MLP projector + Llama decoder) built
offline, for testing that the second model family goes through the same code path as Qwen2-VL.

The tokenizer is a byte-level BPE trained here with Llama-3-style special tokens and a Llama-3
chat template whose image parts emit ``<image>``; the image processor is the PIL (slow) LLaVA one,
so nothing needs torchvision. Deterministic: same files on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from openft.models.tiny import _corpus, save_tiny

SPECIAL_TOKENS = (
    "<|end_of_text|>",  # pad
    "<|begin_of_text|>",  # bos
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",  # end of turn = eos
    "<image>",
)
VOCAB_SIZE = 1024
IMAGE_SIZE = 56  # CLIP input; 14 px patches -> 4x4 = 16 image tokens (CLS dropped)
PATCH_SIZE = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nYou may call these tools:"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% elif message.content %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<image>{% elif part.type == 'text' %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}'
    "{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_processor() -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def llama_text_config(*, vocab: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    """The tiny Llama language model (LLaVA's here, and SmolVLM's, whose text model is a Llama)."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )


def build_tiny_llava(out: Path) -> Path:
    """Write a tiny LLaVA (model + processor) to ``out`` and return it."""
    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=64,
        ),
        text_config=llama_text_config(
            vocab=VOCAB_SIZE, bos=ids["<|begin_of_text|>"], eos=ids["<|eot_id|>"], pad=ids["<|end_of_text|>"]
        ),
        image_token_id=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model = LlavaForConditionalGeneration(config)
    return save_tiny(
        model, processor, out, eos=ids["<|eot_id|>"], pad=ids["<|end_of_text|>"], bos=ids["<|begin_of_text|>"]
    )
