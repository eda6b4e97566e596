"""Weights into and out of an FSDP2-sharded model a slice or a file at a time: no rank ever holds the model.

Loading (:func:`pretrained_files`, :func:`stored_names`, :func:`load_slices`): every rank builds
the architecture with its parameters on the meta device (buffers real: rotary ``inv_freq`` is
computed, not stored), ``fully_shard`` splits each parameter along dim 0, and each rank then reads
from the safetensors file(s) only the rows of each tensor it owns (``safe_open(...).get_slice``
reads lazily, so a rank's host memory holds one slice at a time). One ``model.safetensors`` or
Hugging Face's sharded form (``model.safetensors.index.json`` + ``model-0000k-of-0000N.safetensors``)
both work. Weights that are not safetensors (``.bin``), or stored under names this transformers
does not map by renaming alone, keep the old path: rank 0 reads them and broadcasts
(``distributed.shard``).

Saving (:func:`save_servable`): the servable checkpoint is an ordinary Hugging Face folder. Rather
than gathering the whole model onto rank 0, every rank gathers one parameter at a time and rank 0
writes them into files of at most :data:`MAX_FILE_BYTES` (the sharded form plus its index when
there is more than one file), so rank 0's extra memory is one file's worth, not the model. Names
are what ``save_pretrained`` writes: tied copies dropped, transformers' renamings reverted, so
the tensors are the same as a single process writes.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch

from openft.training import distributed

MAX_FILE_BYTES = 2**30
"""Largest weights file of a servable checkpoint written from shards (one bigger tensor gets its own)."""
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def pretrained_files(source: str) -> dict[str, Path] | None:
    """Which safetensors file holds each stored tensor of the weights at ``source`` (a folder, or a
    Hugging Face id already in the local cache); None when they are not safetensors."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or not an id): the caller falls back
            return None
    if (folder / INDEX_FILE).exists():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).exists():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), "pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
    return None


_NAMES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str] | None] = weakref.WeakKeyDictionary()


def stored_names(model: torch.nn.Module) -> dict[str, str] | None:
    """Each tensor ``save_pretrained`` would write (model name, tied copies dropped) -> its name in
    the file (transformers' renamings reverted, e.g. Qwen2-VL's ``model.language_model.*`` saved as
    ``model.*``). None when the conversion does more than rename (fused or split tensors): then the
    tensors cannot be streamed one by one. Shapes only, so a meta-device model will do. Remembered
    per model: transformers finds a model's renamings by its class name, which ``fully_shard``
    changes, so ``distributed.shard`` asks before sharding."""
    if model not in _NAMES:
        _NAMES[model] = _stored_names(model)
    return _NAMES[model]


def _stored_names(model: torch.nn.Module) -> dict[str, str] | None:
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if distributed.sharded(model):
        raise RuntimeError("stored_names must first be asked of the model before it is sharded")

    placeholders = {
        name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in model.state_dict().items()
    }
    for ignored in getattr(model, "_keys_to_ignore_on_save", None) or ():
        placeholders.pop(ignored, None)
    kept = remove_tied_weights_from_state_dict(placeholders, model)
    reverted = revert_weight_conversion(model, dict(kept))
    owner = {id(t): name for name, t in kept.items()}
    if len(reverted) != len(kept) or any(id(t) not in owner for t in reverted.values()):
        return None
    return {owner[id(t)]: stored for stored, t in reverted.items()}


def slices_cover(model: torch.nn.Module, source: str) -> bool:
    """Every tensor of ``model`` (built on the meta device) can be read slice by slice from ``source``."""
    files = pretrained_files(source)
    names = stored_names(model) if files is not None else None
    return names is not None and files is not None and all(s in files for s in names.values())


def align_frozen_dtypes(model: torch.nn.Module, source: str) -> None:
    """Give ``model``'s frozen floating-point parameters (meta) the dtype they are stored in, as
    ``from_pretrained`` loads them; trained ones stay fp32 (AdamW's master weights)."""
    from safetensors import safe_open

    files, names = pretrained_files(source), stored_names(model)
    assert files is not None and names is not None  # checked by slices_cover
    with contextlib.ExitStack() as stack:
        opened: dict[Path, Any] = {}
        for name, stored in names.items():
            t = model.get_parameter_or_buffer(name)
            if not isinstance(t, torch.nn.Parameter) or t.requires_grad or not t.is_floating_point():
                continue
            path = files[stored]
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(str(path), "pt"))
            dtype = _DTYPES.get(opened[path].get_slice(stored).get_dtype())
            if dtype is not None and dtype != t.dtype:
                t.data = t.data.to(dtype)  # free on the meta device


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_slices(model: torch.nn.Module, source: str) -> None:
    """Fill a sharded, materialised (``to_empty``) ``model`` from the safetensors at ``source``:
    each rank reads just the rows of each parameter it owns (FSDP2's dim-0 chunks, the last one
    shorter or empty), and persistent buffers whole.

    Each tensor opens its file anew: safetensors maps the whole file, and the pages a rank has read
    stay mapped (counted in its RSS, ~its share of the model again) until the file is closed."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files, names = pretrained_files(source), stored_names(model)
    assert files is not None and names is not None  # checked by slices_cover
    with torch.no_grad():
        for name, stored in names.items():
            path = files[stored]
            target = model.get_parameter_or_buffer(name)
            with safe_open(str(path), "pt", device="cpu") as f:
                piece = f.get_slice(stored)
                if list(piece.get_shape()) != list(target.shape):
                    raise ValueError(
                        f"{path.name}: {stored} has shape {piece.get_shape()}, the model expects {list(target.shape)}"
                    )
                if not isinstance(target, DTensor):
                    target.copy_(f.get_tensor(stored))
                    continue
                local = target.to_local()
                if local.numel() == 0:
                    continue  # a rank past the last (short) chunk owns nothing of this tensor
                shape, offset = compute_local_shape_and_global_offset(
                    target.shape, target.device_mesh, target.placements
                )
                rows = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
                local.copy_(piece[rows] if rows else f.get_tensor(stored))


def save_servable(model: torch.nn.Module, directory: Path, *, max_file_bytes: int | None = None) -> bool:
    """Write a sharded ``model``'s weights into ``directory`` (rank 0 writes; every rank must call
    it, in the same order of gathers): files of at most ``max_file_bytes`` (default
    :data:`MAX_FILE_BYTES`), one
    ``model.safetensors`` when all fit, else Hugging Face's sharded form with its index. Returns
    False, having written nothing, when the names need more than renaming (the caller then
    gathers the whole state)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    distributed.reshard(model)  # the shards, not weights a forward left gathered
    names = stored_names(model)
    if names is None:
        return False
    model_name = {stored: name for name, stored in names.items()}
    placeholders = {
        stored: torch.empty(t.shape, dtype=t.dtype, device="meta")
        for stored, t in ((s, model.get_parameter_or_buffer(n)) for s, n in model_name.items())
    }
    split = split_torch_state_dict_into_shards(
        placeholders,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_file_bytes or MAX_FILE_BYTES,
    )
    main = distributed.is_main()
    for filename, stored_in_file in split.filename_to_tensors.items():
        part: dict[str, torch.Tensor] = {}
        for stored in stored_in_file:
            t = model.get_parameter_or_buffer(model_name[stored]).detach()
            whole = t.full_tensor() if isinstance(t, DTensor) else t  # a collective: every rank
            if main:
                part[stored] = whole.to("cpu", copy=True).contiguous()
            del whole
        if main:
            save_file(part, str(Path(directory) / filename), metadata={"format": "pt"})
        del part
    if main and split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},  # type: ignore[operator]
            "weight_map": split.tensor_to_filename,
        }
        (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return True
