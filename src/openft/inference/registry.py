"""Which models are loaded: an LRU of (base, weights) -> model + processor, shared by all requests.

The caller (the API) resolves a model id to a :class:`ModelRef` (base path or HF id, plus the
weights folder of a fine-tuned model or checkpoint); this module never looks anything up in
storage. Loading happens once per key even under concurrent requests (a lock per key), and
all generation on one loaded model goes through its :attr:`LoadedModel.batcher`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openft.inference.batcher import Batcher
from openft.models.families import END_OF_TURN_TOKENS

log = logging.getLogger(__name__)

# Generation stops at any turn closer the tokenizer knows, and at the end-of-text markers.
_STOP_TOKENS = (*END_OF_TURN_TOKENS, "<|endoftext|>", "<|end|>")


@dataclass(frozen=True)
class ModelRef:
    id: str
    """What the user sent as ``model`` (a base name or an ``ft:...`` id)."""
    base: str
    """Resolved base model: a local folder or a Hugging Face id."""
    weights_dir: Path | None
    """Fine-tuned weights (peft adapter or full weights, see ``models.loader``); None for a base model."""


@dataclass
class LoadedModel:
    """A model ready to generate, with what generation needs to know about it."""

    ref: ModelRef
    """The ref it was first loaded for (other ids may share it; see ``Registry``)."""
    model: Any
    processor: Any
    """A multimodal processor (with ``.tokenizer``) or a bare tokenizer for text-only models."""
    adapter: str | None = None
    """The peft adapter this model is (rows of several adapters of one base share one forward);
    None = the model itself, without adapters."""
    shared_batcher: Batcher | None = field(default=None, repr=False)
    """The decode loop of the base this adapter shares; None = the model's own."""
    eos_token_ids: frozenset[int] = frozenset()
    """Tokens that end the assistant's turn (finish_reason ``stop``)."""
    pad_token_id: int | None = None
    context_length: int | None = None
    """Maximum positions the model handles (prompt + completion), if its config says."""

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        if self.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        if self.context_length is None:
            self.context_length = _context_length(self.model)

    @property
    def batcher(self) -> Batcher:
        """The decode loop every request for this model (and its base's adapters) goes through."""
        if self.shared_batcher is None:
            self.shared_batcher = Batcher(self.model, device=self.device)
        return self.shared_batcher

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Length of the longest vocabulary entry's spelling: no token covers more characters of
        text than that (byte-level BPE spells one character per byte, SentencePiece one per
        character), so it bounds a prompt's token count from below without tokenizing it."""
        return max((len(t) for t in self.tokenizer.get_vocab()), default=1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in _STOP_TOKENS if tok in vocab)
    if not ids:
        raise ValueError("the model's tokenizer has no end-of-sequence token; cannot tell where a reply ends")
    return frozenset(ids)


def _context_length(model: Any) -> int | None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


Loader = Callable[..., tuple[Any, Any]]


def _default_loader(base: str, weights_dir: Path | None, *, device: str) -> tuple[Any, Any]:
    from openft.models.loader import load_model  # imports torch/transformers/peft: only when needed

    return load_model(base, weights_dir, device=device)


def _device_of(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


def _adapter_bytes(weights_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(weights_dir).glob("adapter_model*") if p.is_file())


class Registry:
    """What is loaded for chat; thread-safe.

    - Base models and fully fine-tuned models are separate weights: an LRU of at most
      ``max_loaded`` of them, each with its own decode loop.
    - A LoRA fine-tune does not get weights of its own: its adapter is attached to its base's
      loaded model (peft, under a name) and its requests join the base's decode loop, so
      requests for many fine-tunes of one base share one copy of the base and one batch.
      Attached adapters are bounded by their size (``adapter_cache_bytes``): the least
      recently used idle ones are detached first.

    ``loader`` (tests) replaces ``models.loader.load_model``; it is called as
    ``loader(base, weights_dir, device=...)`` and returns ``(model, processor)``.
    """

    def __init__(
        self,
        *,
        device: str = "auto",
        max_loaded: int = 4,
        adapter_cache_bytes: int = 1024**3,
        max_batch_rows: int = 32,
        max_waiting_rows: int = 512,
        loader: Loader | None = None,
        threads: int | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        if threads is not None:
            from openft.models.loader import set_torch_threads

            set_torch_threads(threads, purpose="chat")
        self.device = device
        self.max_loaded = max_loaded
        self.adapter_cache_bytes = adapter_cache_bytes
        self.max_batch_rows = max_batch_rows
        self.max_waiting_rows = max_waiting_rows
        self._loader = loader or _default_loader
        self._lock = threading.Lock()  # guards the dicts below, never held while loading
        self._loaded: OrderedDict[tuple[str, str | None], LoadedModel] = OrderedDict()
        self._ids: dict[tuple[str, str | None], set[str]] = {}
        self._key_locks: dict[tuple[str, str | None], threading.Lock] = {}
        # Attached adapters: (base, adapter dir) -> its view on the base, and its size.
        self._adapters: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._adapter_size: dict[tuple[str, str], int] = {}

    @staticmethod
    def _key(ref: ModelRef) -> tuple[str, str | None]:
        return (ref.base, str(ref.weights_dir) if ref.weights_dir is not None else None)

    def get(self, ref: ModelRef) -> LoadedModel:
        """The loaded model for ``ref``, loading it (once, even if many ask at the same time) if needed."""
        if ref.weights_dir is not None and (Path(ref.weights_dir) / "adapter_config.json").exists():
            return self._get_adapter(ref)
        return self._get_weights(ref)

    def _get_weights(self, ref: ModelRef) -> LoadedModel:
        key = self._key(ref)
        with self._lock:
            hit = self._hit(key, ref)
            if hit is not None:
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; others wait here, then find it loaded
            with self._lock:
                hit = self._hit(key, ref)
                if hit is not None:
                    return hit
            log.info("loading model %s (base=%s, weights=%s)", ref.id, ref.base, ref.weights_dir)
            model, processor = self._loader(ref.base, ref.weights_dir, device=self.device)
            loaded = LoadedModel(
                ref=ref,
                model=model,
                processor=processor,
                shared_batcher=Batcher(
                    model,
                    device=_device_of(model),
                    max_rows=self.max_batch_rows,
                    max_waiting=self.max_waiting_rows,
                ),
            )
            with self._lock:
                self._loaded[key] = loaded
                self._ids[key] = {ref.id}
                while len(self._loaded) > self.max_loaded:
                    old_key, old = self._loaded.popitem(last=False)
                    self._forget(old_key)
                    log.info("unloading model %s (least recently used)", old.ref.id)
            return loaded

    def _get_adapter(self, ref: ModelRef) -> LoadedModel:
        from openft import adapters
        from openft.models.loader import load_processor

        key = (ref.base, str(ref.weights_dir))
        with self._lock:
            view = self._adapters.get(key)
            if view is not None:
                self._adapters.move_to_end(key)
                self._ids.setdefault(key, set()).add(ref.id)
                return view
        base = self._get_weights(ModelRef(id=ref.base, base=ref.base, weights_dir=None))
        batcher = base.batcher
        with batcher.lock:  # no forward runs while the model changes
            with self._lock:
                view = self._adapters.get(key)
                if view is not None:
                    return view
            name = f"a{abs(hash(key)):x}"
            model = adapters.attach_adapter(batcher.model, Path(str(ref.weights_dir)), name=name)
            batcher.set_model(model)
            base.model = model
            weights = Path(str(ref.weights_dir))
            has_own = any((weights / f).exists() for f in ("processor_config.json", "tokenizer_config.json"))
            processor = load_processor(str(weights) if has_own else ref.base)
            view = LoadedModel(
                ref=ref, model=model, processor=processor, adapter=name, shared_batcher=batcher
            )
            size = _adapter_bytes(Path(str(ref.weights_dir)))
            with self._lock:
                self._adapters[key] = view
                self._adapter_size[key] = size
                self._ids[key] = {ref.id}
            self._shrink_adapters(batcher)
        log.info("attached adapter %s (%d bytes) to %s", ref.id, size, ref.base)
        return view

    def _shrink_adapters(self, batcher: Batcher) -> None:
        """Detach least recently used idle adapters of this base until the cache fits (lock held)."""
        from openft import adapters

        with self._lock:
            total = sum(self._adapter_size.values())
            if total <= self.adapter_cache_bytes:
                return
            busy = batcher.adapters_in_use()
            victims = []
            for key, view in self._adapters.items():
                if total <= self.adapter_cache_bytes or len(self._adapters) - len(victims) <= 1:
                    break
                if view.shared_batcher is batcher and view.adapter not in busy:
                    victims.append(key)
                    total -= self._adapter_size[key]
            for key in victims:
                view = self._adapters.pop(key)
                self._adapter_size.pop(key, None)
                self._ids.pop(key, None)
        for key in victims:
            adapters.detach_adapter(batcher.model, name=view.adapter)  # type: ignore[arg-type]
            log.info("detached adapter %s (adapter cache over %d bytes)", key[1], self.adapter_cache_bytes)

    def _forget(self, key: tuple[str, str | None]) -> None:
        """Drop a loaded entry (lock held), with the adapters attached to it."""
        self._ids.pop(key, None)
        self._key_locks.pop(key, None)
        if key[1] is None:
            for akey in [k for k in self._adapters if k[0] == key[0]]:
                self._adapters.pop(akey)
                self._adapter_size.pop(akey, None)
                self._ids.pop(akey, None)

    def _hit(self, key: tuple[str, str | None], ref: ModelRef) -> LoadedModel | None:
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            self._ids[key].add(ref.id)
        return loaded

    def evict(self, model_id: str) -> None:
        """Forget every loaded entry served under ``model_id`` (e.g. the model was deleted).

        A generation already running keeps its reference and finishes; memory is freed after.
        """
        with self._lock:
            for key in [k for k, ids in self._ids.items() if model_id in ids]:
                if key in self._adapters:
                    self._adapters.pop(key)
                    self._adapter_size.pop(key, None)
                    self._ids.pop(key, None)
                else:
                    self._loaded.pop(key, None)  # type: ignore[arg-type]
                    self._forget(key)  # type: ignore[arg-type]
                log.info("evicted model %s", model_id)

    def loaded_ids(self) -> list[str]:
        """Ids of the loaded models, least recently used first (for logs and tests)."""
        with self._lock:
            return [loaded.ref.id for loaded in self._loaded.values()]

    def adapter_ids(self) -> list[str]:
        """Ids of the attached adapters, least recently used first."""
        with self._lock:
            return [view.ref.id for view in self._adapters.values()]
