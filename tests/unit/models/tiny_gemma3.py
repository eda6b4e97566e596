"""A tiny random Gemma 3 vision-language model (``Gemma3ForConditionalGeneration``: SigLIP vision
tower, average-pooling projector, Gemma 3 decoder with bidirectional attention over each image's
tokens), built offline for testing the ``gemma3`` family through openft's one code path.

Real facts it reproduces, checked against published copies of google/gemma-3-4b-it's
``config.json`` (boi 255999, eoi 256000, image 262144, ``eos_token_id: [1, 106]``,
``mm_tokens_per_image: 256``, SigLIP 896 px / 14 px patches), the Gemma 3 chat template as shipped
with the gemma-3-270m GGUF export (``{{ bos_token }}`` ... ``first_user_prefix``), and transformers
5.24's ``Gemma3Processor`` / ``Gemma3ImageProcessorPil`` (pan-and-scan defaults) — no model hub
here, so not against the google/* repositories themselves:

- special tokens ``<pad>`` (id 0 there), ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3),
  ``<start_of_turn>`` (105), ``<end_of_turn>`` (106), ``<start_of_image>`` (boi, 255999),
  ``<end_of_image>`` (eoi, 256000), ``<image_soft_token>`` (262144, the per-feature placeholder);
  here they are ids 0-8 of a 1,024-token byte-level BPE trained locally;
- generation stops on ``<eos>`` or ``<end_of_turn>`` (``eos_token_id: [1, 106]``);
- the chat template below is the published one, verbatim: roles ``user`` / ``model``, a system
  message becomes ``system + "\\n\\n"`` at the start of the first user turn, each image part is
  ``<start_of_image>`` (the processor expands it to ``\\n\\n<start_of_image>`` +
  ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``), text parts are
  trimmed, no tool calls;
- pan-and-scan defaults of the published processor (off; min crop 256 px, at most 4 crops,
  aspect ratio >= 1.2 to activate).

Tiny sizes: 112 px images, 14 px patches (8x8 patches) pooled 2x2 into ``mm_tokens_per_image=16``
tokens; a 2-layer decoder with Gemma 3's sliding/full layer interleave (1:1 here, 5:1 in the real
models), tied embeddings as in the real checkpoints. Deterministic: same files on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from openft.models.tiny import build_bpe_tokenizer, save_tiny

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
VOCAB_SIZE = 1024
IMAGE_SIZE = 112
PATCH_SIZE = 14
TOKENS_PER_IMAGE = 16
"""``mm_tokens_per_image``: (112/14)^2 = 64 patches, average-pooled 2x2 into 16 tokens (the real
models pool 64x64 patches 4x4 into 256)."""
PROJECTOR_STD = 0.1
"""transformers initialises the projector's weight to zeros (a checkpoint always overwrites it);
a random one instead makes the tiny model start, as a real one does, with image features that
reach the decoder, so a frozen-tower fine-tune learns colours in a few epochs."""
SEED = 4321

# The Gemma 3 instruct chat template, verbatim (roles user/model, images as <start_of_image>).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    bpe = build_bpe_tokenizer(
        SPECIAL_TOKENS, vocab_size=VOCAB_SIZE, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe.backend_tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        # What Gemma3Processor reads (``tokenizer.boi_token``...), named as in the published
        # tokenizer_config.json.
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def build_processor() -> Gemma3Processor:
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear, as published
        do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=TOKENS_PER_IMAGE,
    )


def build_tiny_gemma3(out: Path) -> Path:
    """Write a tiny Gemma 3 VLM (model + processor) to ``out`` and return it."""
    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            vision_use_head=False,
        ),
        text_config=Gemma3TextConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=512,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=2048,
            bos_token_id=ids["<bos>"],
            eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
            pad_token_id=ids["<pad>"],
        ),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Gemma3ForConditionalGeneration(config)
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=PROJECTOR_STD)
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    return save_tiny(model, processor, out, eos=eos, pad=ids["<pad>"], bos=ids["<bos>"])
