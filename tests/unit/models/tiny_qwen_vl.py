"""Tiny random Qwen2.5-VL and Qwen3-VL models built offline: the real transformers architectures
(``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``), a byte-level BPE
trained here with the families' real special tokens, and the published chat templates.

What was checked against the published checkpoints (tokenizer_config.json, chat_template.json,
preprocessor_config.json, config.json):

- **Qwen/Qwen2.5-VL-7B-Instruct** (also -3B/-72B): special tokens ``<|endoftext|>`` 151643 (pad),
  ``<|im_start|>`` 151644, ``<|im_end|>`` 151645 (eos, end of turn), ``<|object_ref_start|>`` ..
  ``<|quad_end|>`` 151646-151651, ``<|vision_start|>`` 151652, ``<|vision_end|>`` 151653,
  ``<|vision_pad|>`` 151654, ``<|image_pad|>`` 151655, ``<|video_pad|>`` 151656 (all special);
  ``<tool_call>`` 151657, ``</tool_call>`` 151658, ``<|fim_*|>``/``<|repo_name|>``/``<|file_sep|>``
  151659-151664 (added, not special). Chat template: Qwen2-VL's, unchanged (a default system
  prompt "You are a helpful assistant." when the first message is not a system one; no tools
  and no tool calls). Image processor: ``Qwen2VLImageProcessor``, patch 14, merge 2 (28 px per
  image token), pixel budget ``min_pixels`` 3136 / ``max_pixels`` 12845056, CLIP mean/std.
- **Qwen/Qwen3-VL-8B-Instruct** (also -2B/-4B/-32B-Instruct): the same ids plus ``<tool_response>``
  151665, ``</tool_response>`` 151666, ``<think>`` 151667, ``</think>`` 151668 (added, not
  special). Chat template: ChatML, no default system prompt, Hermes-style ``<tool_call>`` JSON and
  ``<tool_response>`` in a user turn (the template pinned byte for byte by a public test of the
  Qwen3-VL-8B-Instruct GGUF, 5,292 bytes); the *-Thinking* checkpoints differ (a ``<think>`` block
  in the generation prompt and in replies after the last user turn; not built here). Image
  processor: ``Qwen2VLImageProcessor`` with patch 16, merge 2 (32 px per image token), pixel budget
  ``shortest_edge`` 65536 / ``longest_edge`` 16777216, mean/std 0.5. ``Qwen3VLProcessor``.

Here the special tokens take ids from 0 in the same order (the tiny vocabulary is 2,048); the
pixel budgets are small: 16-64 image tokens (Qwen3-VL's published minimum, 64 tokens, enlarges
small pictures too; Qwen2.5-VL's is 4 tokens). Without torchvision the real processor classes
cannot be built with their video half, so the processor is the image-only variant openft's
loader uses (:func:`openft.models.loader.image_only_processor`); it saves as the real class
(``"processor_class": "Qwen2_5_VLProcessor"`` / ``"Qwen3VLProcessor"``) like a real checkpoint.
Deterministic: same files on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from openft.models.loader import image_only_processor
from openft.models.tiny import _edge_filters, build_bpe_tokenizer, qwen_text_config, save_tiny

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
FORMAT_VERSION = "2"
"""Bump when the built files change: cached copies of another version are rebuilt."""
VOCAB_SIZE = 2048
SPECIAL_TOKENS = (  # real order (ids 151643-151656 in the published tokenizers)
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PLAIN_TOKENS = (  # 151657-151664: added but not special (assistant text may contain them)
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN3_PLAIN_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # 151665-151668

# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json (the same as Qwen2-VL-7B-Instruct's).
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN3_VL_CONTENT = """            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
"""
_QWEN3_VL_SYSTEM = """        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
"""
# Qwen/Qwen3-VL-8B-Instruct chat_template.json.
QWEN3_VL_TEMPLATE = (
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
"""
    + _QWEN3_VL_SYSTEM
    + """        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
"""
    + _QWEN3_VL_SYSTEM
    + """        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
"""
    + _QWEN3_VL_CONTENT
    + """        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
"""
    + _QWEN3_VL_CONTENT
    + """        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

# Per family: processor class, chat template, patch size, image mean/std, extra plain tokens.
_SPEC: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "processor": Qwen2_5_VLProcessor,
        "template": QWEN2_5_VL_TEMPLATE,
        "patch": 14,
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "plain": PLAIN_TOKENS,
        # Published: min_pixels 3136 (4 tokens). 16 here: a 56-px training picture then spans 4x4
        # tokens, which the random-init tower needs to read colours reliably (4: 0.88-0.92 held out).
        "min_tokens": 16,
        "seed": 2525,
    },
    "qwen3_vl": {
        "processor": Qwen3VLProcessor,
        "template": QWEN3_VL_TEMPLATE,
        "patch": 16,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "plain": PLAIN_TOKENS + QWEN3_PLAIN_TOKENS,
        "min_tokens": 16,  # published: 65536 pixels = 64 tokens, so small pictures are enlarged
        "seed": 3333,
    },
}


def pixels_per_token(family: str) -> int:
    """Side of the square of pixels one image token covers (patch x merge)."""
    return _SPEC[family]["patch"] * 2


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer(
        SPECIAL_TOKENS,
        vocab_size=VOCAB_SIZE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        plain_added_tokens=_SPEC[family]["plain"],
    )


def build_processor(family: str) -> Any:
    """The family's processor (image-only variant of the real class), pixel budget up to 64 tokens."""
    spec = _SPEC[family]
    unit = pixels_per_token(family)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=unit * unit * spec["min_tokens"],
        max_pixels=unit * unit * 64,
        patch_size=spec["patch"],
        merge_size=2,
        temporal_patch_size=2,
        image_mean=list(spec["mean"]),
        image_std=list(spec["std"]),
    )
    cls = image_only_processor(spec["processor"])
    return cls(
        image_processor=image_processor, tokenizer=build_tokenizer(family), chat_template=spec["template"]
    )


def _config(family: str, ids: dict[str, int]) -> Any:
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            # mrope_section sums to head_dim / 2 (32 / 2), as Qwen2.5-VL's [16, 24, 24] does for 128.
            text_config=qwen_text_config(
                VOCAB_SIZE, ids, {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
            ),
            vision_config={
                "depth": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "out_hidden_size": 128,  # the merger projects into the text hidden size
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 56,  # windowed attention in block 0, full attention in block 1
                "fullatt_block_indexes": [1],
            },
            **tokens,
        )
    text = qwen_text_config(
        VOCAB_SIZE,
        # Qwen3-VL: interleaved M-RoPE ([24, 20, 20] for head_dim 128 in the 8B).
        ids,
        {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    )
    text["head_dim"] = 32
    return Qwen3VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,  # a learned 16x16 grid, interpolated per image
            "deepstack_visual_indexes": [0, 1],  # both blocks feed the first two text layers
        },
        **tokens,
    )


def build_tiny_qwen_vl(family: str, out: Path) -> Path:
    """Write a tiny ``family`` model (model + processor) to ``out`` and return it (a few seconds)."""
    processor = build_processor(family)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _config(family, ids)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SPEC[family]["seed"])
        model = cls(config)
        # Colour and edge filters in the patch embedding, as openft-tiny-vlm has (random ones
        # pass colour on but hardly shape).
        _edge_filters(model.model.visual.patch_embed.proj.weight)
    end, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    return save_tiny(model, processor, out, eos=end, pad=pad, bos=pad)
