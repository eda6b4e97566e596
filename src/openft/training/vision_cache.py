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
frozen modules always run in eval mode (``auto`` declines a tower with active dropout rather than
change it).

When the projector trains but the tower is frozen (``train_projector``; full fine-tuning, which
trains the projector unless ``train_vision_tower`` trains the tower too), the cache keeps the
tower's output instead: the projector's input, per example. Every family's projector is a module
that the model's ``get_image_features`` calls with the tower's output as its first argument
(Qwen2-VL / Qwen2.5-VL ``visual.merger``, Qwen3-VL's ``visual.merger`` and DeepStack's
``visual.deepstack_merger_list[i]`` on intermediate block outputs, LLaVA's and Gemma 3's
``multi_modal_projector``, Idefics3/SmolVLM's ``connector``). So the wrapped ``get_image_features``
runs the model's own code once per new image set without autograd, the tower in eval mode, and
keeps each projector's input through a forward pre-hook; then, and for every later batch, it runs
the projectors (with autograd, in the model's own mode) on the cached inputs of the batch's
examples and returns their output in the model's format. The projectors act on each merged patch
group, pooled image or tile on its own, so projecting one example's cached rows is projecting them
in any batch. Qwen2.5-VL's tower works in window order and the model undoes it after the merger:
each image's windows permute only its own merge units, so an example's rows are kept in window
order with its part of the window index its forward used (from ``permute_input_for_window_attn``),
and the merged rows are put back in image order as the model does (the same sums in the same
order as without the cache, so gradients agree too).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
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
from openft.training.trainable import projector_roots

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
    """Frozen features: ``(n_image_tokens, hidden)``, the projected features of one example's
    images. Tower features: the rows of the projector's input for them (flattened to 2-D)."""
    deepstack: list[torch.Tensor] | None
    """Qwen3-VL: one tensor per DeepStack layer, like ``pooler`` (its merger's output or input)."""
    order: torch.Tensor | None = None
    """Qwen2.5-VL's tower features, kept in window order: the merged units' order back to the image's."""


@dataclass(frozen=True)
class TowerSplit:
    """Where a model's frozen vision tower ends and its trained projector begins."""

    projectors: tuple[nn.Module, ...]
    """The projector modules as the model calls them: the main one first, then Qwen3-VL's
    DeepStack mergers in layer order."""
    windowed: nn.Module | None
    """Qwen2.5-VL's vision model, whose tower runs in window order (``permute_input_for_window_attn``)."""
    row_width: int
    """Features per cached row (the tower's width; several selected layers side by side for LLaVA)."""
    rows_per_token: int
    """Tower rows folded into one image token by the projector (``Family.patches_per_token``)."""


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
        split: TowerSplit | None = None,
    ) -> None:
        self.device = device
        self.mode = mode
        self.dtype_bytes = dtype_bytes
        self.enabled = True
        self.split = split
        """Set when the projector trains: the cache keeps the tower's output (module docstring)."""
        self.tower_calls = 0
        """Vision-tower passes (calls of the model's ``get_image_features`` that ran it)."""
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
        # The instance attribute wins over the method.
        self._inner.get_image_features = self._capture if split is None else self._capture_tower
        self._slots: dict[bytes, int] = {}
        self._tokens: list[int] = []
        self._entries: list[_Entry | None] = []
        self._seen: dict[int, tuple[Rendered, int]] = {}  # id(item) -> (item kept alive, slot)
        self._lock = threading.Lock()  # the collate thread and the training thread both key items
        self._pending: list[int] | None = None
        self._captured: Any = None
        self._pooler_is_tensor = False
        self._row_shapes: list[torch.Size] = []
        """Tower features: each projector's input shape after its first dimension (restored from rows)."""

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
        tokens = sum(self._tokens[s] for s in slots)
        if self.split is None:
            need = vision_cache_bytes(
                image_tokens=tokens,
                hidden_size=self._hidden,
                layers=self._layers,
                dtype_bytes=self.dtype_bytes,
            )
            what = "frozen vision tower: features"
        else:
            need = vision_cache_bytes(
                image_tokens=tokens * self.split.rows_per_token,
                hidden_size=self.split.row_width,
                layers=len(self.split.projectors),
                dtype_bytes=self.dtype_bytes,
            )
            what = "frozen vision tower, trained projector: the tower's outputs"
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
            f"{what} of {len(slots)} distinct image sets are computed once and "
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
        example's are cached; otherwise ``batch`` as is, and the features the call computes are kept.
        Tower features: ``batch`` as is (the projector runs inside the model's call, where it would
        without the cache), the wrapped ``get_image_features`` told which examples it serves."""
        if not self.enabled or slots is None:
            yield batch
            return
        wanted = slots.tolist()
        if self.split is not None:
            self._pending = wanted
            try:
                yield batch
            finally:
                self._pending = None
            return
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
        pooled = [self._up(e.pooler) for e in entries]
        deep = None
        if entries[0].deepstack is not None:
            deep = [[self._up(e.deepstack[k]) for e in entries] for k in range(len(entries[0].deepstack))]  # type: ignore[index]
        rest = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
        return {**rest, "mm_encoder_outputs": {"image": self._features(pooled, deep)}}

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _features(self, pooled: list[torch.Tensor], deep: list[list[torch.Tensor]] | None) -> Any:
        """Per-example features (and DeepStack layers) in the form ``get_image_features`` returns."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(
            pooler_output=torch.cat(pooled) if self._pooler_is_tensor else tuple(pooled)
        )
        if deep is not None:
            out["deepstack_features"] = [tuple(layer) for layer in deep]
        return out

    def _capture(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``get_image_features``, tower and projector in eval mode and without autograd
        (they are frozen), its output kept for :meth:`serving`."""
        self.tower_calls += 1
        with torch.no_grad(), _eval_mode(self._eval_modules):
            out = self._original(*args, **kwargs)
        if self._pending is not None:
            self._captured = out
        return out

    def _capture_tower(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``get_image_features`` when the projector trains: the tower's output from the
        cache (running the tower once, without autograd, for a batch with a new image set), then
        the projectors on it with autograd."""
        wanted = self._pending
        if wanted is None:  # not a call openft tagged (no slots): the model's own path
            with _eval_mode(self._eval_modules):
                return self._original(*args, **kwargs)
        if any(self._entries[s] is None for s in wanted):
            self._run_tower(wanted, args, kwargs)
        else:
            self.hits += len(wanted)
        return self._project(wanted)

    def _run_tower(self, wanted: list[int], args: Any, kwargs: Any) -> None:
        split = self.split
        assert split is not None
        self.tower_calls += 1
        inputs: dict[int, torch.Tensor] = {}
        windows: list[torch.Tensor] = []

        def keeper(i: int) -> Any:
            def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
                inputs.setdefault(i, args[0])

            return keep

        hooks = [m.register_forward_pre_hook(keeper(i)) for i, m in enumerate(split.projectors)]
        owner = split.windowed
        if owner is not None:
            method = type(owner).permute_input_for_window_attn  # type: ignore[attr-defined]

            def permute(t: torch.Tensor, window_index: torch.Tensor, seq_len: int) -> torch.Tensor:
                windows.append(window_index)
                return method(owner, t, window_index, seq_len=seq_len)

            owner.permute_input_for_window_attn = permute  # type: ignore[assignment]
        try:
            with torch.no_grad(), _eval_mode(self._eval_modules):
                out = self._original(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            if owner is not None:
                del owner.permute_input_for_window_attn
        if len(inputs) != len(split.projectors):
            raise RuntimeError(
                f"the model's get_image_features called {len(inputs)} of {len(split.projectors)} projectors"
            )
        self._pooler_is_tensor = isinstance(out.pooler_output, torch.Tensor)
        feats = [inputs[i] for i in range(len(split.projectors))]
        self._row_shapes = [f.shape[1:] for f in feats]
        tokens = sum(self._tokens[s] for s in wanted)
        rows = feats[0].numel() // feats[0].shape[-1]
        if tokens == 0 or rows % tokens:
            raise RuntimeError(f"{rows} vision-tower rows for {tokens} image tokens")
        counts = [self._tokens[s] * (rows // tokens) for s in wanted]
        parts = [_split_rows(f, counts) for f in feats]
        # Qwen2.5-VL: each image's windows are a permutation of its own merged units, so an
        # example's rows stay in window order (the merger sees what it sees without the cache) and
        # its own window index says how its merged units go back to image order.
        orders = torch.split(windows[0], [self._tokens[s] for s in wanted]) if windows else None
        start = 0
        for i, slot in enumerate(wanted):
            if self._entries[slot] is None:
                kept = [self._to_host(p[i]) for p in parts]
                order = None if orders is None else torch.argsort(orders[i] - start).cpu()
                self._entries[slot] = _Entry(kept[0], kept[1:] if len(kept) > 1 else None, order)
            start += self._tokens[slot]

    def _project(self, wanted: list[int]) -> Any:
        """The projectors (with autograd) on the cached tower outputs of ``wanted``, per example."""
        split = self.split
        assert split is not None
        entries: list[_Entry] = [self._entries[s] for s in wanted]  # type: ignore[misc]
        counts = [self._tokens[s] for s in wanted]
        back = None
        if entries[0].order is not None:  # Qwen2.5-VL: what the model does after its merger
            offsets = [0, *itertools.accumulate(counts)][:-1]
            back = self._up(torch.cat([e.order + o for e, o in zip(entries, offsets, strict=True)]))  # type: ignore[operator]
        outs = []
        for i, (projector, shape) in enumerate(zip(split.projectors, self._row_shapes, strict=True)):
            rows = torch.cat([self._up(e.pooler if i == 0 else e.deepstack[i - 1]) for e in entries])  # type: ignore[index]
            out = projector(rows.reshape(-1, *shape))
            outs.append(_split_rows(out if back is None else out[back], counts, detach=False))
        return self._features(list(outs[0]), [list(o) for o in outs[1:]] if len(outs) > 1 else None)

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


def _split_rows(features: Any, counts: list[int], *, detach: bool = True) -> tuple[torch.Tensor, ...]:
    rows = (
        torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        if isinstance(features, (list, tuple))
        else features.reshape(-1, features.shape[-1])
    )
    if rows.shape[0] != sum(counts):
        raise RuntimeError(f"{rows.shape[0]} image features for {sum(counts)} image tokens")
    return torch.split(rows.detach() if detach else rows, counts)


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
    the model has a vision tower): of the image features when tower and projector are frozen, of the
    tower's output when only the projector trains. ``on`` refuses a model whose tower trains or
    whose split is unknown. ``sharded``: the job runs under FSDP."""
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
    training = {family.component(name) for name, p in model.named_parameters() if p.requires_grad}
    split = None
    if "vision_tower" in training:
        why_not = "the vision tower trains, so its outputs change every step"
    elif sharded:
        why_not = "the model is sharded (FSDP), where every rank must run the same vision forwards"
    else:
        try:
            _feature_module(model)
            if "projector" in training:
                split = tower_split(model)
        except LookupError as e:
            why_not = str(e)
    # What runs frozen: the tower, and the projector unless it trains (then it runs as without the cache).
    frozen = [m for n, m in vision if split is None or family.component(n) == "vision_tower"]
    dropout = _active_dropout(model, frozen)
    if why_not is None and dropout and mode == "auto":
        why_not = f"the frozen vision tower has active dropout ({dropout}); set cache_vision_features 'on' to run it without"
    if why_not is not None:
        if mode == "on":
            raise InvalidRequest(
                f"cache_vision_features 'on' is not possible: {why_not}", param="openft.cache_vision_features"
            )
        reporter.on_message(f"vision features are not cached: {why_not}", once="vision-cache")
        return None
    return VisionCache(model, device, mode=mode, dtype_bytes=dtype_bytes, eval_modules=frozen, split=split)


def tower_split(model: nn.Module) -> TowerSplit:
    """The tower/projector boundary of ``model`` (frozen tower, trained projector), or LookupError
    saying why there is none we can cache at."""
    family = find_family(model)
    if family is None:
        raise LookupError(f"{type(model).__name__} has no vision family")
    main: list[nn.Module] = []
    deep: list[nn.Module] = []
    windowed = None
    for root in projector_roots(model):
        module = model.get_submodule(root)
        if isinstance(module, nn.ModuleList):
            # Qwen3-VL's DeepStack mergers, called in layer order (under peft each member is wrapped
            # on its own: training.trainable.lora_plan).
            deep.extend(module)
        else:
            main.append(module)
    if len(main) != 1:
        raise LookupError(
            f"{type(model).__name__} has {len(main)} projector modules where one takes the tower's output"
        )
    for module in model.modules():
        if hasattr(type(module), "permute_input_for_window_attn"):  # Qwen2.5-VL's vision model
            windowed = module
    config = model.config
    vc = config.vision_config
    width = int(getattr(vc, "embed_dim", None) or vc.hidden_size)  # Qwen2-VL: embed_dim; others: hidden_size
    layers = getattr(config, "vision_feature_layer", None)
    if isinstance(layers, (list, tuple)):  # LLaVA: several selected layers side by side
        width *= len(layers)
    return TowerSplit(
        projectors=(main[0], *deep),
        windowed=windowed,
        row_width=width,
        rows_per_token=family.patches_per_token(config),
    )


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
