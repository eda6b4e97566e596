"""Per-family facts about the vision-language architectures openft trains and serves.

Rendering, training and serving go through one code path for every model; what differs between
architectures is a handful of facts, kept here in one small registry:

- the **image placeholder** the chat template emits and the processor expands into exactly as
  many tokens as the vision encoder produces features (``<|image_pad|>``, ``<image>``), and every
  other vision-structure token user text must never turn into (``<|vision_start|>``, ...);
- the **end-of-turn** token that closes an assistant reply (trained on, so the model learns to
  stop);
- the **``detail`` rule**: processor kwargs for OpenAI's ``detail: "low" | "high" | "auto"``;
- **which parameters are which part**: vision tower, projector, language model, output head (by
  name prefix, so training can freeze or select them without knowing the architecture).

Families are looked up by ``config.model_type`` (a model, a config, or a peft wrapper) or by the
processor's class (rendering only sees the processor). Supported: Qwen2-VL / Qwen2.5-VL (the
built-in ``openft-tiny-vlm`` is a Qwen2-VL), Qwen3-VL, LLaVA-1.5-style models (CLIP-like vision
tower, MLP projector, any causal LM), Gemma 3 (SigLIP tower, average-pooling projector, Gemma 3
decoder attending bidirectionally within each image) and Idefics3 / SmolVLM / SmolVLM2 (SigLIP
vision tower, pixel-shuffle connector, Llama-style decoder; images split into tiles plus a
global image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from openft.errors import InvalidRequest

Component = Literal["vision_tower", "projector", "language_model", "lm_head", "other"]
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""Tokens that close a turn in the common open-model chat templates (ChatML, Llama 3, Gemma, Phi-3), in
order of preference: what renders and stops a model of no listed family."""

LOW_DETAIL_MAX_PIXELS = 448 * 448
"""``detail="low"`` on pixel-budget processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the budget becomes
``min(448*448, max_pixels // 4)``, never below ``min_pixels``."""

# Prefixes peft (and similar wrappers) put in front of the base model's parameter names.
_WRAPPER_PREFIXES = ("base_model.model.",)


def _no_detail(image_processor: Any, detail: str) -> dict[str, Any]:
    return {}


def _pixel_budget_detail(image_processor: Any, detail: str) -> dict[str, Any]:
    """Qwen2-VL: the number of image tokens follows the pixel budget, so ``low`` lowers it."""
    size = getattr(image_processor, "size", None)
    if detail != "low" or not size:
        return {}
    size = dict(size)
    if not size.get("longest_edge") or not size.get("shortest_edge"):
        return {}
    low = max(size["shortest_edge"], min(LOW_DETAIL_MAX_PIXELS, size["longest_edge"] // 4))
    return {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": low}}


def _pan_and_scan_detail(image_processor: Any, detail: str) -> dict[str, Any]:
    """Gemma 3: ``high`` adds pan-and-scan crops, ``low`` never does, ``auto`` keeps the
    checkpoint's processor setting (off in Google's published configs)."""
    if detail == "high":
        return {"do_pan_and_scan": True}
    if detail == "low":
        return {"do_pan_and_scan": False}
    return {}


def _one_patch_per_token(config: Any) -> int:
    return 1


def _merged_patches(config: Any) -> int:
    """Qwen2-VL: the merger folds ``spatial_merge_size``^2 patches into one token."""
    return int(getattr(config.vision_config, "spatial_merge_size", 1)) ** 2


def _pooled_patches(config: Any) -> int:
    """Gemma 3: (image_size / patch_size)^2 patches are average-pooled into ``mm_tokens_per_image``
    tokens (4096 -> 256 in the published models)."""
    vc = config.vision_config
    return max(1, (vc.image_size // vc.patch_size) ** 2 // config.mm_tokens_per_image)


@dataclass(frozen=True)
class Family:
    name: str
    """Short stable name (``"qwen2_vl"``, ``"llava"``)."""
    model_types: tuple[str, ...]
    """``config.model_type`` values of this family."""
    processor_classes: tuple[str, ...]
    """Processor class names (anywhere in the MRO) that identify the family."""
    image_processor_classes: tuple[str, ...]
    """Image-processor class names, without a ``Pil``/``Fast`` suffix, that identify the family."""
    image_token: str
    """What the chat template emits per image; the processor expands it to one token per vision
    feature."""
    placeholder_tokens: tuple[str, ...]
    """Every vision-structure token (``image_token`` included). User text containing one is
    encoded as plain characters, and the dataset validator flags it (``control_token_in_content``)."""
    end_of_turn_candidates: tuple[str, ...]
    """Tokens that close a turn, in order of preference; the first one the tokenizer knows wins
    (the chat template, not the architecture, decides: a LLaVA on Llama-3 ends with ``<|eot_id|>``,
    one on Qwen2 with ``<|im_end|>``). Falls back to the tokenizer's eos token."""
    vision_tower_prefixes: tuple[str, ...]
    """Parameter-name prefixes of the vision encoder (the projector excluded)."""
    projector_prefixes: tuple[str, ...]
    """Parameter-name prefixes of the vision-to-text projector (merger)."""
    language_model_prefixes: tuple[str, ...]
    """Parameter-name prefixes of the text decoder (embeddings included, output head excluded)."""
    lm_head_prefixes: tuple[str, ...] = ("lm_head.",)
    feature_token: str | None = None
    """The token the processor repeats once per vision feature, when it is not ``image_token``
    (Gemma 3: the template emits ``<start_of_image>``, the processor expands it to
    ``\\n\\n<start_of_image>`` + N x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``)."""
    token_types_key: str = "mm_token_type_ids"
    """The model's keyword for the per-token modality ids (1 on image features) when its processor
    returns them: Qwen2-VL's M-RoPE reads ``mm_token_type_ids``, Gemma 3's bidirectional image
    attention ``token_type_ids``."""
    detail_kwargs: Callable[[Any, str], dict[str, Any]] = _no_detail
    """``(image_processor, detail) -> processor kwargs`` for one image."""
    patches_per_token: Callable[[Any], int] = _one_patch_per_token
    """``(model config) -> vision-encoder patches behind one image token``: what the memory plan
    multiplies image tokens by to size the vision tower's activations."""
    detail_rule: str = ""
    """The ``detail`` rule in words (for docs and error messages)."""
    tool_format: str | None = None
    """How the chat template writes tool calls: a key of ``models.tool_calls.FORMATS``
    (``hermes``, ``llama3_json``, ``mistral``, ``phi4_mini``); None: the language model's chat
    format decides (:func:`tool_format_of`), else it is detected from the template."""
    pixel_budget: bool = False
    """The image processor's ``size`` is a pixel budget (Qwen2-VL style: ``shortest_edge`` /
    ``longest_edge`` are the min / max pixels of an image, ``max_pixels`` before transformers 5),
    not side lengths: images larger than openft's decode budget keep up to ``max_pixels``."""

    def max_pixels(self, image_processor: Any) -> int | None:
        """The most pixels the image processor keeps of an image, for pixel-budget families."""
        if not self.pixel_budget or image_processor is None:
            return None
        size = dict(getattr(image_processor, "size", None) or {})
        cap = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
        return cap if isinstance(cap, int) else None

    def end_of_turn(self, tokenizer: Any) -> str | None:
        vocab = tokenizer.get_vocab()
        for tok in self.end_of_turn_candidates:
            if tok in vocab:
                return tok
        return getattr(tokenizer, "eos_token", None)

    def component(self, param_name: str) -> Component:
        """Which part of the model a parameter (or module) name belongs to; peft's
        ``base_model.model.`` prefix is ignored. The one answer to "is this the vision tower":
        training (``training.trainable``, ``training.memory``) asks here."""
        for prefix in _WRAPPER_PREFIXES:
            if param_name.startswith(prefix):
                param_name = param_name[len(prefix) :]
        # A module's own name (``model.visual.merger``) lacks the dot its prefix ends with.
        name = param_name + "."
        # Projector first: some families nest it under the vision module (Qwen's visual.merger).
        for part, prefixes in (
            ("projector", self.projector_prefixes),
            ("vision_tower", self.vision_tower_prefixes),
            ("language_model", self.language_model_prefixes),
            ("lm_head", self.lm_head_prefixes),
        ):
            if name.startswith(prefixes):
                return part  # type: ignore[return-value]
        return "other"


_QWEN_VISION_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")

# Checked against Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct (tokenizer_config.json,
# chat_template.json, preprocessor_config.json): <|image_pad|> 151655 between <|vision_start|>
# 151652 and <|vision_end|> 151653, <|im_end|> 151645 ends a turn; patch 14 x merge 2 = 28 px per
# image token, min_pixels 3136, max_pixels 12845056. Their published chat template (the same in
# both) has no tools: tool calls are refused when rendering (``tool_calls_not_supported``).
QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    processor_classes=("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "TinyVLProcessor"),
    image_processor_classes=("Qwen2VLImageProcessor",),
    image_token="<|image_pad|>",
    placeholder_tokens=_QWEN_VISION_TOKENS,
    end_of_turn_candidates=("<|im_end|>",),
    vision_tower_prefixes=("model.visual.patch_embed.", "model.visual.blocks."),
    projector_prefixes=("model.visual.merger.",),
    language_model_prefixes=("model.language_model.",),
    detail_kwargs=_pixel_budget_detail,
    pixel_budget=True,
    patches_per_token=_merged_patches,
    tool_format="hermes",
    detail_rule=(
        "image tokens follow the pixel budget (one token per 28x28 pixels): 'low' caps it at "
        "min(448*448, max_pixels // 4) after shrinking the image to fit 512x512; 'high'/'auto' use "
        "the processor's max_pixels"
    ),
)

# Checked against Qwen/Qwen3-VL-8B-Instruct (tokenizer_config.json, chat_template.json,
# preprocessor_config.json, config.json): the same vision tokens and <|im_end|> as Qwen2.5-VL;
# Qwen2VLImageProcessor with patch 16 x merge 2 = 32 px per image token, pixel budget
# size.shortest_edge 65536 / size.longest_edge 16777216 (min/max pixels); a learned position grid
# (``visual.pos_embed``) and DeepStack mergers feeding vision features from inner vision blocks
# into the first text layers (projector); interleaved M-RoPE. Tool calls: Hermes <tool_call> JSON.
# The -Thinking checkpoints have another template (<think> blocks) but the same facts here.
QWEN3_VL = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    processor_classes=("Qwen3VLProcessor",),
    image_processor_classes=(),  # Qwen2VLImageProcessor, shared with Qwen2-VL: the processor decides
    image_token="<|image_pad|>",
    placeholder_tokens=_QWEN_VISION_TOKENS,
    end_of_turn_candidates=("<|im_end|>",),
    vision_tower_prefixes=("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
    projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_model_prefixes=("model.language_model.",),
    detail_kwargs=_pixel_budget_detail,
    pixel_budget=True,
    patches_per_token=_merged_patches,
    tool_format="hermes",
    detail_rule=(
        "image tokens follow the pixel budget (one token per 32x32 pixels): 'low' caps it at "
        "min(448*448, max_pixels // 4) after shrinking the image to fit 512x512; 'high'/'auto' use "
        "the processor's longest_edge (max pixels)"
    ),
)

LLAVA = Family(
    name="llava",
    model_types=("llava",),
    processor_classes=("LlavaProcessor",),
    image_processor_classes=("LlavaImageProcessor", "CLIPImageProcessor"),
    image_token="<image>",
    placeholder_tokens=("<image>",),
    end_of_turn_candidates=("<|eot_id|>", "<|im_end|>", "<end_of_turn>"),
    vision_tower_prefixes=("model.vision_tower.",),
    projector_prefixes=("model.multi_modal_projector.",),
    language_model_prefixes=("model.language_model.",),
    detail_kwargs=_no_detail,
    detail_rule=(
        "every image is resized and centre-cropped to the vision tower's fixed input, so each "
        "image costs the same number of tokens whatever its detail"
    ),
)

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    processor_classes=("Gemma3Processor",),
    image_processor_classes=("Gemma3ImageProcessor",),
    image_token="<start_of_image>",
    feature_token="<image_soft_token>",
    placeholder_tokens=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
    end_of_turn_candidates=("<end_of_turn>",),
    vision_tower_prefixes=("model.vision_tower.",),
    projector_prefixes=("model.multi_modal_projector.",),
    language_model_prefixes=("model.language_model.",),
    token_types_key="token_type_ids",
    detail_kwargs=_pan_and_scan_detail,
    patches_per_token=_pooled_patches,
    tool_format=None,  # the published template has no tools; see chat format "gemma"
    detail_rule=(
        "every image (or crop) is resized to the vision tower's square input and pooled to "
        "mm_tokens_per_image tokens (256 in the published models); 'low' is that one image; "
        "'high' adds pan-and-scan crops: an image whose aspect ratio is at least 1.2 and whose "
        "crops would be at least 256 px gets 2-4 crops of that cost each, plus a short text "
        "('Here is the original image ... and here are some crops ...'); 'auto' keeps the "
        "checkpoint's processor setting, which Google's published configs leave off (pan-and-scan "
        "is an inference-time option in the Gemma 3 report), so it costs what 'low' costs"
    ),
)


def _tile_split_detail(image_processor: Any, detail: str) -> dict[str, Any]:
    """Idefics3 / SmolVLM: ``low`` turns image splitting off (one global image)."""
    return {"do_image_splitting": False} if detail == "low" else {}


# Checked against HuggingFaceTB/SmolVLM2-2.2B-Instruct and SmolVLM2-500M-Video-Instruct
# (tokenizer_config.json, processor_config.json, preprocessor_config.json, config.json, as quoted in
# public code; the chat template as transformers 5.24 ships it in processing_smolvlm):
# <end_of_utterance> 49279 is eos and ends every turn, <|im_start|> (bos) opens the conversation,
# <|im_end|> pads; <fake_token_around_image> 49189, <image> 49190, <global-img> 49152,
# <row_R_col_C> 49153.. for R, C in 1..6; 512 px tiles of 16 px patches, pixel shuffle 4 -> 64
# image tokens per tile; size.longest_edge 2048. HuggingFaceTB/SmolVLM-Instruct (v1) has the same
# template without the video branch; HuggingFaceM4/Idefics3-8B-Llama3 opens with <|begin_of_text|>
# (Llama 3 tokenizer), 364 px tiles, 169 tokens per tile, same markers.
SMOLVLM = Family(
    name="smolvlm",
    model_types=("idefics3", "smolvlm"),
    processor_classes=("Idefics3Processor", "SmolVLMProcessor"),
    image_processor_classes=("Idefics3ImageProcessor", "SmolVLMImageProcessor"),
    image_token="<image>",
    # Every token the processor's image expansion writes. The row/column tokens of grids larger
    # than 6x6 do not exist in the published tokenizers (their ``size``/``max_image_size`` give
    # at most 4x4 tiles), so 6x6 covers them.
    placeholder_tokens=(
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    ),
    end_of_turn_candidates=("<end_of_utterance>",),
    vision_tower_prefixes=("model.vision_model.",),
    projector_prefixes=("model.connector.",),
    language_model_prefixes=("model.text_model.",),
    detail_kwargs=_tile_split_detail,
    detail_rule=(
        "'low': no splitting, the image is resized to one tile (max_image_size) and costs one tile "
        "of tokens; 'high' and 'auto': the processor's splitting, the longest edge resized to its "
        "size (2048 px on the published checkpoints) and cut into max_image_size tiles (512 px: up "
        "to 4x4) plus one global image, each tile costing image_seq_len tokens (64 on SmolVLM2, "
        "169 on Idefics3-8B) plus its <row_R_col_C> and <fake_token_around_image> markers. "
        "'auto' is 'high' because the published checkpoints split by default (do_image_splitting) "
        "and were trained that way"
    ),
    # The published templates have no tool calls or tool schemas: conversations with tool calls
    # are refused at render time (tool_calls_not_supported), whatever the tokenizer's ChatML tokens.
    tool_format=None,
    # The pixel shuffle folds scale_factor**2 encoder patches into one token (16 on SmolVLM2).
    patches_per_token=lambda config: int(getattr(config, "scale_factor", 1)) ** 2,
)

FAMILIES: tuple[Family, ...] = (QWEN2_VL, QWEN3_VL, LLAVA, GEMMA3, SMOLVLM)


@dataclass(frozen=True)
class ChatFormat:
    """The facts of a text chat format that rendering and serving need, whatever the architecture
    (a Llama-architecture checkpoint may speak Llama 3 or Mistral; the tokenizer decides)."""

    name: str
    """``"llama3"``, ``"chatml"``, ``"gemma"``, ``"mistral"``, ``"phi3"``."""
    markers: tuple[str, ...]
    """Tokens whose presence in the tokenizer's vocabulary identifies the format."""
    end_of_turn: str
    """Closes an assistant reply; trained on so the model learns to stop."""
    tool_format: str | None
    """Tool-call format name (``models/tool_calls.py``); None: the template has no tool calls."""
    system_role: bool = True
    """False: the template has no (usable) system turn, so rendering folds a leading system
    message into the first user turn as ``system + "\\n\\n" + user`` (what Gemma 3's own
    template does)."""
    models: tuple[str, ...] = ()
    """Published checkpoints whose chat template this format was checked against."""


LLAMA3 = ChatFormat(
    name="llama3",
    markers=("<|start_header_id|>", "<|eot_id|>"),
    end_of_turn="<|eot_id|>",
    tool_format="llama3_json",
    models=(
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
        "meta-llama/Llama-3.3-70B-Instruct",
    ),
)
CHATML = ChatFormat(
    name="chatml",
    markers=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
    tool_format="hermes",
    models=("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B"),
)
GEMMA = ChatFormat(
    name="gemma",
    markers=("<start_of_turn>", "<end_of_turn>"),
    end_of_turn="<end_of_turn>",
    tool_format=None,
    system_role=False,
    models=("google/gemma-2-9b-it", "google/gemma-3-1b-it"),
)
MISTRAL = ChatFormat(
    name="mistral",
    markers=("[INST]", "[/INST]"),
    end_of_turn="</s>",
    tool_format="mistral",
    # v0.3 shows the system message only when the last message is a user turn (so never in a
    # training example); v0.1/v0.2 raise on it. Folding keeps it in every render.
    system_role=False,
    models=("mistralai/Mistral-7B-Instruct-v0.3",),
)
PHI3 = ChatFormat(
    name="phi3",
    markers=("<|assistant|>", "<|end|>"),
    end_of_turn="<|end|>",
    tool_format=None,
    models=("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct"),
)
CHAT_FORMATS: tuple[ChatFormat, ...] = (LLAMA3, CHATML, GEMMA, MISTRAL, PHI3)


def find_chat_format(processor: Any) -> ChatFormat | None:
    """The chat format a tokenizer (or a processor's tokenizer) speaks, by its special tokens."""
    tokenizer = getattr(processor, "tokenizer", processor)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab()
    return next((f for f in CHAT_FORMATS if all(m in vocab for m in f.markers)), None)


def tool_format_of(processor: Any) -> str | None:
    """The tool-call format a model's template writes: the vision family's if it fixes one, else
    its language model's chat format's."""
    family = find_family(processor)
    if family is not None and family.tool_format is not None:
        return family.tool_format
    fmt = find_chat_format(processor)
    return fmt.tool_format if fmt else None


def find_family(obj: Any) -> Family | None:
    """The family of a model, config, processor, or ``model_type`` string; None if unknown."""
    if isinstance(obj, str):
        return next((f for f in FAMILIES if obj in f.model_types), None)
    config = getattr(obj, "config", obj)  # a model (or peft wrapper) -> its config
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        found = find_family(model_type)
        if found is not None:
            return found
    names = {c.__name__ for c in type(obj).__mro__}
    for fam in FAMILIES:
        if names & set(fam.processor_classes):
            return fam
    image_processor = getattr(obj, "image_processor", None)
    if image_processor is not None:
        ip_names = {_strip_backend(c.__name__) for c in type(image_processor).__mro__}
        for fam in FAMILIES:
            if ip_names & set(fam.image_processor_classes):
                return fam
    return None


def family_of(obj: Any) -> Family:
    """Like :func:`find_family`, but an unknown family is the user's to fix: ``InvalidRequest``."""
    fam = find_family(obj)
    if fam is None:
        config = getattr(obj, "config", obj)
        what = obj if isinstance(obj, str) else getattr(config, "model_type", None) or type(obj).__name__
        supported = ", ".join(t for f in FAMILIES for t in f.model_types)
        raise InvalidRequest(
            f"unsupported vision-language model family {what!r}; supported: {supported}", param="model"
        )
    return fam


def _strip_backend(name: str) -> str:
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
