"""Resolve a base-model name and load a model + processor, optionally with fine-tuned weights.

A servable weights folder (a checkpoint or a job's final weights) holds either a peft adapter
(``adapter_config.json``) or full weights (``config.json``), the processor files, and a small
``openft.json`` marker ``{"kind": "adapter" | "full", "base_model": "..."}`` that tells serving
how to load it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import types
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from openft.errors import InvalidRequest
from openft.models.tiny import ensure_tiny_vlm
from openft.models.tiny_text import ensure_tiny_text
from openft.settings import TINY_MODEL, TINY_TEXT_MODELS

MARKER = "openft.json"

WeightsKind = Literal["adapter", "full"]


def resolve_base(name: str, cache_dir: Path) -> str:
    """``openft-tiny-vlm`` / ``openft-tiny-<format>`` -> its generated folder; a local folder -> its
    path; else an HF id as is."""
    if name == TINY_MODEL:
        return str(ensure_tiny_vlm(Path(cache_dir)))
    if name in TINY_TEXT_MODELS:
        return str(ensure_tiny_text(name.removeprefix("openft-tiny-"), Path(cache_dir)))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def weights_kind(weights_dir: Path) -> WeightsKind:
    """What a weights folder holds: a peft adapter or full model weights."""
    weights_dir = Path(weights_dir)
    if (weights_dir / "adapter_config.json").exists():
        return "adapter"
    if (weights_dir / "config.json").exists():
        return "full"
    raise InvalidRequest(f"{weights_dir} holds neither a peft adapter nor full model weights", param="model")


def write_marker(weights_dir: Path, *, kind: WeightsKind, base_model: str) -> None:
    """Write ``openft.json`` so serving knows how to load ``weights_dir``."""
    (Path(weights_dir) / MARKER).write_text(json.dumps({"kind": kind, "base_model": base_model}))


def read_marker(weights_dir: Path) -> dict[str, str]:
    return json.loads((Path(weights_dir) / MARKER).read_text())


def load_model(
    base: str,
    weights_dir: Path | None = None,
    *,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    attn_implementation: str | None = None,
    weights: bool = True,
) -> tuple[Any, Any]:
    """Load ``base`` (a folder or HF id, see :func:`resolve_base`) and its processor.

    ``weights_dir`` with an adapter: the adapter is applied on top of ``base`` (trainable when
    ``trainable``). With full weights: those are loaded instead of ``base``. The model is moved to
    ``device`` (``"auto"``: cuda if available, else cpu) and put in eval mode unless ``trainable``.
    ``attn_implementation`` (``"sdpa"``, ``"flash_attention_2"``...): None keeps transformers' default.

    ``weights=False``: the same architecture with its parameters on the meta device, nothing read
    (an FSDP rank, which then reads or receives its shards). Buffers are real: the non-persistent
    ones (rotary ``inv_freq``) are computed, not stored, and are small. An adapter is not applied:
    full fine-tuning merges it into the base, whose structure this already is.
    """
    kind = weights_kind(weights_dir) if weights_dir is not None else None
    source = str(weights_dir) if kind == "full" else base
    if not weights:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = _auto_model(source, dtype, attn_implementation, empty=True)
        model.tie_weights()  # accelerate's patched register_parameter re-wraps, untying them
        model.train(trainable)
        return model, load_processor(base if kind != "full" else source)
    model = _auto_model(source, dtype, attn_implementation)
    processor_source = base
    if weights_dir is not None and any(
        (Path(weights_dir) / f).exists() for f in ("processor_config.json", "tokenizer_config.json")
    ):
        processor_source = str(weights_dir)
    processor = load_processor(processor_source)
    if kind == "adapter":
        # peft directly (not openft.adapters): models/ sits beside adapters.py in the layers.
        model = PeftModel.from_pretrained(model, str(weights_dir), is_trainable=trainable)
    model.to(resolve_device(device))
    model.train(trainable)
    return model, processor


def load_empty_model(base: str) -> Any:
    """The model's architecture on the meta device: sizes and parameter counts, no weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    with init_empty_weights():
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError:
            return AutoModelForCausalLM.from_config(config)


def load_config(base: str) -> Any:
    """Only the model config (context length, architecture): no weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base)


def load_processor(base: str) -> Any:
    """Only the processor (tokenizer + image processor + chat template): enough to validate and
    count tokens without loading weights.

    A processor with a video half that needs torchvision (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: their
    ``AutoProcessor`` load raises without it) is loaded without that half where torchvision is
    missing: openft takes images, never video, so nothing is lost.
    """
    try:
        return AutoProcessor.from_pretrained(base)
    except Exception:
        cls = _processor_class(base)
        if cls is None or is_torchvision_available() or "video_processor" not in cls.get_attributes():
            raise
        return image_only_processor(cls).from_pretrained(base)


@functools.cache
def image_only_processor(cls: type) -> type:
    """``cls`` (a transformers processor class with a ``video_processor``) without its video half:
    same name, same behaviour for text and images, saved and loaded like ``cls`` (its
    ``processor_class`` stays ``cls.__name__``), constructible without torchvision."""

    # ProcessorMixin takes its sub-processors from ``get_attributes`` (overridden: no video), and
    # keeps, saves and reloads the settings named by ``__init__``'s signature and ``__code__``. So
    # the new ``__init__`` is ``cls``'s own function (same code: SmolVLM's ``image_seq_len`` and
    # every other setting stay), only with ``video_processor=None`` as a default; the ``None``
    # it passes on is dropped by ProcessorMixin, which pairs positional sub-processors with
    # ``get_attributes``.
    init = cls.__init__
    positional = [p for p in inspect.signature(init).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = [p.name for p in positional]
    defaults = tuple(
        None if p.default is p.empty else p.default for p in positional[names.index("video_processor") :]
    )
    __init__ = types.FunctionType(init.__code__, init.__globals__, init.__name__, defaults, init.__closure__)
    __init__.__kwdefaults__ = init.__kwdefaults__
    __init__.__doc__ = init.__doc__

    def get_attributes(klass: type) -> list[str]:
        return [a for a in cls.get_attributes() if a != "video_processor"]

    namespace = {
        "__init__": __init__,
        "get_attributes": classmethod(get_attributes),
        "__module__": __name__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def _processor_class(source: str) -> type | None:
    """The processor class a model folder or hub id names (as ``AutoProcessor`` finds it)."""
    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        class_name = json.loads(Path(path).read_text()).get("processor_class")
        if isinstance(class_name, str):
            cls = processor_class_from_name(class_name)
            return cls if isinstance(cls, type) and hasattr(cls, "get_attributes") else None
    return None


def _auto_model(
    source: str, dtype: torch.dtype | None, attn_implementation: str | None = None, *, empty: bool = False
) -> Any:
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        return _from_pretrained(AutoModelForImageTextToText, source, kwargs, attn_implementation, empty)
    except ValueError:  # a text-only base model: still trainable on text-only data
        return _from_pretrained(AutoModelForCausalLM, source, kwargs, attn_implementation, empty)


def _from_pretrained(
    cls: Any, source: str, kwargs: dict[str, Any], attn_implementation: str | None, empty: bool = False
) -> Any:
    """``cls.from_pretrained(source)``, or with ``empty`` ``cls.from_config`` of its config (the
    caller puts it on the meta device; the dtypes are aligned with the loaded model's later)."""
    if empty:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)

        def build(**kw: Any) -> Any:
            return cls.from_config(config, **kw)
    else:

        def build(**kw: Any) -> Any:
            return cls.from_pretrained(source, **kw)

    if attn_implementation is None:
        return build(**kwargs)
    try:
        return build(attn_implementation=attn_implementation, **kwargs)
    except ValueError as e:
        if "attn_implementation" not in str(e):
            raise
        # The architecture does not offer it (Gemma 2 has no sdpa path): keep its own default.
        return build(**kwargs)


def set_torch_threads(threads: int, *, purpose: str) -> None:
    """Size this process's torch thread pools (its share of the cores, see ``openft.threads``).
    Call it at process start: inter-op threads can only be set before torch first uses them."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already started; the intra-op count, which matters most, is set
        pass
    logging.getLogger("openft").info("torch uses %d thread(s) for %s in this process", threads, purpose)
