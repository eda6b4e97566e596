"""Image features of a frozen vision encoder, computed once per distinct image set and reused.

When nothing between pixels and image embeddings trains (vision tower and projector frozen: the
default LoRA plan), an image's embeddings are the same every epoch and in every validation pass,
so running the tower again each step is wasted work. The hook is transformers 5's own: every
vision family's base model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA, Gemma 3, Idefics3/SmolVLM)
computes them in ``get_image_features`` and its ``forward`` accepts them precomputed as
``mm_encoder_outputs={"image": ...}`` (``pooler_output``: the projected features; Qwen3-VL adds
DeepStack's per-layer ``deepstack_features``). So:

- a batch whose examples are all cached runs without ``pixel_values``: their features are copied
  back to the device (pinned host memory on CUDA, non-blocking) and passed as ``mm_encoder_outputs``;
- any other batch runs the model's own path; ``get_image_features`` is wrapped on the instance to
  keep its output, which is split per example (by its count of image tokens, which the model checks
  equal to its features) and stored in the compute dtype it came out in.

Keys: a content hash of each example's vision tensors (pixels, grids), so shuffled batches, the
validation passes, the two sides of a DPO pair and resumed runs all find the same entries.

Exactness: cached features are what the model computes, bit for bit, provided the tower is
deterministic. Dropout inside a frozen tower would draw new masks each step, so while caching the
tower and projector always run in eval mode (``auto`` declines a tower with active dropout rather
than change it). When the projector or the tower trains (full fine-tuning always trains the
projector), caching is off: the features change with every step, and caching only the tower's
part would need a per-family split of ``get_image_features`` that transformers does not expose.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from openft.errors import InvalidRequest
from openft.models.families import find_family
from openft.models.render import Rendered
from openft.training.memory import available_bytes, vision_cache_bytes
from openft.training.reporter import Reporter

CacheMode = Literal["auto", "on", "off"]
SLOTS_KEY = "openft_vision_slots"
"""Batch entry (collated on the host, never sent to the model): the cache slot of each example with
images, in row order."""
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes")
"""Inputs only the vision encoder reads: dropped when features come from the cache (the grids and
token-type ids stay: M-RoPE positions and Gemma 3's image attention need them)."""
HOST_BUDGET_FRACTION = 0.25
"""``auto`` caches only when the estimate fits this share of the host's available memory."""


@dataclass
class _Entry:
    pooler: torch.Tensor
    """``(n_image_tokens, hidden)``: the projected features of one example's images."""
    deepstack: list[torch.Tensor] | None
    """Qwen3-VL: one ``(n_image_tokens, hidden)`` tensor per DeepStack layer."""


class VisionCache:
    """Per-example image features of one model, filled on first use (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        mode: CacheMode,
        dtype_bytes: int,
        eval_modules: Sequence[nn.Module],
    ) -> None:
        self.device = device
        self.mode = mode
        self.dtype_bytes = dtype_bytes
        self.enabled = True
        self.tower_calls = 0
        """Calls of the model's ``get_image_features`` (each runs the vision tower once)."""
        self.hits = 0
        """Examples whose features came from the cache."""
        config = model.config
        self._token_id = int(config.image_token_id)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._hidden = int(text.hidden_size)
        self._layers = 1 + len(
            getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", ()) or ()
        )
        self._eval_modules = list(eval_modules)
        self._inner = _feature_module(model)
        self._original = self._inner.get_image_features
        self._inner.get_image_features = self._capture  # the instance attribute wins over the method
        self._slots: dict[bytes, int] = {}
        self._tokens: list[int] = []
        self._entries: list[_Entry | None] = []
        self._seen: dict[int, tuple[Rendered, int]] = {}  # id(item) -> (item kept alive, slot)
        self._lock = threading.Lock()  # the collate thread and the training thread both key items
        self._pending: list[int] | None = None
        self._captured: Any = None
        self._pooler_is_tensor = False

    # --- host side (the collate thread) ----------------------------------------------------------

    def slot_of(self, item: Rendered) -> int:
        """The cache slot of ``item``'s images, hashed once per rendered object."""
        seen = self._seen.get(id(item))
        if seen is not None and seen[0] is item:
            return seen[1]
        h = hashlib.blake2b(digest_size=16)
        for key in sorted(item.vision):
            t = item.vision[key].contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        digest = h.digest()
        with self._lock:
            slot = self._slots.get(digest)
            if slot is None:
                slot = self._slots[digest] = len(self._entries)
                self._entries.append(None)
                self._tokens.append(sum(1 for t in item.input_ids if t == self._token_id))
            self._seen[id(item)] = (item, slot)
        return slot

    def tag(self, batch: dict[str, torch.Tensor], items: Sequence[Rendered]) -> dict[str, torch.Tensor]:
        """``batch`` with the slots of its examples that have images (rows in order)."""
        if self.enabled and any(r.vision for r in items):
            batch[SLOTS_KEY] = torch.tensor([self.slot_of(r) for r in items if r.vision], dtype=torch.long)
        return batch

    def admit(self, items: Sequence[Rendered], reporter: Reporter) -> None:
        """Size the cache for ``items`` (every example a run will see) and switch it off, with the
        reason, when it would not fit the host budget (``auto``) or no example has an image."""
        with_images = [r for r in items if r.vision]
        if not with_images:
            self.close()
            return
        slots = {self.slot_of(r) for r in with_images}
        need = vision_cache_bytes(
            image_tokens=sum(self._tokens[s] for s in slots),
            hidden_size=self._hidden,
            layers=self._layers,
            dtype_bytes=self.dtype_bytes,
        )
        budget = int(available_bytes("cpu") * HOST_BUDGET_FRACTION)
        gib = need / 2**30
        if self.mode == "auto" and need > budget:
            self.close()
            reporter.on_message(
                f"vision features are not cached: {len(slots)} distinct image sets need {gib:.2f} GiB, "
                f"over the {budget / 2**30:.2f} GiB host budget ({HOST_BUDGET_FRACTION:.0%} of available "
                "memory); the frozen vision tower runs at every step",
                once="vision-cache",
            )
            return
        reporter.on_message(
            f"frozen vision tower: features of {len(slots)} distinct image sets are computed once and "
            f"cached in host memory ({gib:.3f} GiB)",
            once="vision-cache",
        )

    def close(self) -> None:
        """Off for good: the model's own ``get_image_features`` is back."""
        self.enabled = False
        self._entries.clear()
        self._seen.clear()
        with contextlib.suppress(AttributeError):
            del self._inner.get_image_features

    # --- device side (the training thread) -------------------------------------------------------

    @contextlib.contextmanager
    def serving(self, batch: dict[str, Any], slots: torch.Tensor | None) -> Iterator[dict[str, Any]]:
        """Around one model call: ``batch`` with cached features instead of pixels when every
        example's are cached; otherwise ``batch`` as is, and the features the call computes are kept."""
        if not self.enabled or slots is None:
            yield batch
            return
        wanted = slots.tolist()
        entries = [self._entries[s] for s in wanted]
        if all(e is not None for e in entries):
            self.hits += len(entries)
            yield self._from_cache(batch, entries)  # type: ignore[arg-type]
            return
        self._pending, self._captured = wanted, None
        try:
            yield batch
            if self._captured is not None:
                self._store(wanted, self._captured)
        finally:
            self._pending = self._captured = None

    def _from_cache(self, batch: dict[str, Any], entries: list[_Entry]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        def up(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        pooled = [up(e.pooler) for e in entries]
        out = BaseModelOutputWithPooling(
            pooler_output=torch.cat(pooled) if self._pooler_is_tensor else tuple(pooled)
        )
        if entries[0].deepstack is not None:
            out["deepstack_features"] = [
                tuple(up(e.deepstack[k]) for e in entries)  # type: ignore[index]
                for k in range(len(entries[0].deepstack))
            ]
        rest = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
        return {**rest, "mm_encoder_outputs": {"image": out}}

    def _capture(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``get_image_features``, tower and projector in eval mode and without autograd
        (they are frozen), its output kept for :meth:`serving`."""
        self.tower_calls += 1
        with torch.no_grad(), _eval_mode(self._eval_modules):
            out = self._original(*args, **kwargs)
        if self._pending is not None:
            self._captured = out
        return out

    def _store(self, slots: list[int], out: Any) -> None:
        pooler = out.pooler_output
        self._pooler_is_tensor = isinstance(pooler, torch.Tensor)
        counts = [self._tokens[s] for s in slots]
        parts = [_split_rows(pooler, counts)]
        deep = getattr(out, "deepstack_features", None)
        if deep is not None:
            parts += [_split_rows(layer, counts) for layer in deep]
        for i, slot in enumerate(slots):
            if self._entries[slot] is None:
                kept = [self._to_host(p[i]) for p in parts]
                self._entries[slot] = _Entry(kept[0], kept[1:] if deep is not None else None)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)  # stream-ordered before any later copy back
        return t.detach().clone()  # not a view: the batch's features must be freeable


def _split_rows(features: Any, counts: list[int]) -> tuple[torch.Tensor, ...]:
    rows = (
        torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        if isinstance(features, (list, tuple))
        else features.reshape(-1, features.shape[-1])
    )
    if rows.shape[0] != sum(counts):
        raise RuntimeError(f"{rows.shape[0]} image features for {sum(counts)} image tokens")
    return torch.split(rows.detach(), counts)


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    was = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, w in zip(modules, was, strict=True):
            m.training = w


def _feature_module(model: nn.Module) -> nn.Module:
    """The innermost module that computes image features and takes them precomputed (the base
    ``...Model`` under ``...ForConditionalGeneration`` and any peft wrapper)."""
    found = [
        m
        for m in model.modules()
        if hasattr(m, "get_image_features")
        and "mm_encoder_outputs" in inspect.signature(m.forward).parameters
    ]
    if not found:
        raise LookupError(f"{type(model).__name__} takes no precomputed image features")
    return found[-1]  # modules() is pre-order: children after their parents


def vision_cache_for(
    model: nn.Module,
    device: torch.device,
    mode: CacheMode,
    reporter: Reporter,
    *,
    dtype_bytes: int,
    sharded: bool = False,
) -> VisionCache | None:
    """A cache when ``mode`` allows one and it would be exact, else None (with the reason said when
    the model has a vision tower). ``on`` refuses a model whose image features train. ``sharded``:
    the job runs under FSDP."""
    family = find_family(model)
    if mode == "off" or family is None:
        return None
    vision = [
        (name, m)
        for name, m in model.named_modules()
        if name and family.component(name) in ("vision_tower", "projector")
    ]
    if not vision:
        return None
    why_not = None
    trains = any(
        p.requires_grad
        for name, p in model.named_parameters()
        if family.component(name) in ("vision_tower", "projector")
    )
    dropout = _active_dropout(model, [m for _, m in vision])
    if trains:
        why_not = "the vision tower or projector trains, so image features change every step"
    elif sharded:
        why_not = "the model is sharded (FSDP), where every rank must run the same vision forwards"
    else:
        try:
            _feature_module(model)
        except LookupError as e:
            why_not = str(e)
    if why_not is None and dropout and mode == "auto":
        why_not = f"the frozen vision tower has active dropout ({dropout}); set cache_vision_features 'on' to run it without"
    if why_not is not None:
        if mode == "on":
            raise InvalidRequest(
                f"cache_vision_features 'on' is not possible: {why_not}", param="openft.cache_vision_features"
            )
        reporter.on_message(f"vision features are not cached: {why_not}", once="vision-cache")
        return None
    return VisionCache(model, device, mode=mode, dtype_bytes=dtype_bytes, eval_modules=[m for _, m in vision])


def _active_dropout(model: nn.Module, modules: Sequence[nn.Module]) -> str:
    """The first dropout with a non-zero rate in the vision modules or the vision config, or ''."""
    for m in modules:
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"{type(m).__name__} p={m.p}"
    vc = getattr(model.config, "vision_config", None)
    for key, value in (vc.to_dict() if vc is not None else {}).items():
        if "dropout" in key and isinstance(value, (int, float)) and value > 0:
            return f"{key}={value}"
    return ""
