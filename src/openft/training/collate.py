"""Batching rendered examples: length-grouped batches, a right-padding collator, a padding-free
packing collator, and a background prefetcher."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from openft.models.render import IGNORE_INDEX, TOKEN_ALIGNED_KEYS, Rendered, cat_vision

T = TypeVar("T")
U = TypeVar("U")


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in a shuffled order.

    Shuffle, sort within windows of ``50 * batch_size`` by length, chunk into batches, then shuffle
    the batches, so every epoch sees a different order but each batch pads little.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(batch_size * 50, 1)
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The batch order of one epoch: a pure function of ``(seed, epoch)`` and the lengths, so a
    resumed run replays exactly the batches an uninterrupted run would have seen."""
    return length_grouped_batches(lengths, batch_size, random.Random(f"openft-epoch:{seed}:{epoch}"))


def micro_batches(batch: Sequence[int], size: int | None) -> list[list[int]]:
    """Split one optimizer batch into forward/backward chunks of at most ``size`` (None: whole)."""
    if size is None or size >= len(batch):
        return [list(batch)]
    return [list(batch[i : i + size]) for i in range(0, len(batch), size)]


def target_tokens(item: Rendered) -> int:
    """Tokens the loss is taken over: labelled tokens after the first (nothing predicts token 0)."""
    return sum(1 for t in item.labels[1:] if t != IGNORE_INDEX)


def collate_sft(items: Sequence[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and, when
    any item has images, the concatenated vision tensors plus the per-token modality ids the items
    carry (``mm_token_type_ids`` or ``token_type_ids``), padded with 0 (text) for every row."""
    width = max(len(r.input_ids) for r in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, r in enumerate(items):
        n = len(r.input_ids)
        ids[row, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(r.labels, dtype=torch.long)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_vision = [r for r in items if r.vision]
    if with_vision:
        for key in with_vision[0].vision:
            if key not in TOKEN_ALIGNED_KEYS:
                batch[key] = cat_vision([r.vision[key] for r in with_vision])
        for key in sorted(TOKEN_ALIGNED_KEYS.intersection(*(r.vision for r in with_vision))):
            tt = torch.zeros((len(items), width), dtype=torch.long)
            for row, r in enumerate(items):
                if key in r.vision:
                    tt[row, : len(r.input_ids)] = r.vision[key]
            batch[key] = tt
    return batch


def collate_packed(items: Sequence[Rendered], *, mrope: bool = False) -> dict[str, torch.Tensor]:
    """Padding-free: every item concatenated into one row, ``position_ids`` restarting at 0 for each
    and no ``attention_mask``. transformers (5.x ``masking_utils.find_packed_sequence_indices``)
    reads the restarts as sequence boundaries: a block-diagonal causal mask for sdpa/eager,
    ``cu_seqlens`` for flash-attention, so no token attends across examples. Each item's first
    label is dropped: it would be predicted from the previous example's last token.

    ``mrope``: Qwen2-VL-style models take ``(4, 1, T)`` positions, the text positions (which the
    mask is built from) then the three M-RoPE rows, equal to them for text. Text only: an item with
    images needs per-example M-RoPE positions, so callers collate those batches with padding.
    """
    if any(r.vision for r in items):
        raise ValueError("collate_packed takes text-only items; collate image batches with collate_sft")
    ids = torch.cat([torch.tensor(r.input_ids, dtype=torch.long) for r in items])
    labels = torch.cat([torch.tensor([IGNORE_INDEX, *r.labels[1:]], dtype=torch.long) for r in items])
    positions = torch.cat([torch.arange(len(r.input_ids), dtype=torch.long) for r in items])[None]
    if mrope:
        positions = positions[None].expand(4, 1, -1).contiguous()
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions}


def prefetched(fn: Callable[[T], U], items: Iterable[T], *, ahead: int) -> Iterator[U]:
    """``fn(item)`` for each item, in order, computed up to ``ahead`` items in advance on one
    background thread (collation overlaps the model's step); ``ahead=0`` computes inline. Closing
    the iterator (a stop mid-epoch) drops what was computed ahead."""
    if ahead <= 0:
        yield from map(fn, items)
        return
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openft-collate") as pool:
        pending: deque[Future[U]] = deque(
            pool.submit(fn, x) for _, x in zip(range(ahead), source, strict=False)
        )
        try:
            while pending:
                done = pending.popleft().result()
                for x in source:
                    pending.append(pool.submit(fn, x))
                    break
                yield done
        finally:
            for f in pending:
                f.cancel()


def collate_preference(
    chosen: Sequence[Rendered], rejected: Sequence[Rendered], pad_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded batch for a DPO step: rows ``[0, n)`` are prompt + chosen reply, rows
    ``[n, 2n)`` the same prompts + rejected reply, so a single forward pass scores both sides.

    Vision tensors follow the row order (an image prompt's pixels appear twice, once per side).
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    return collate_sft([*chosen, *rejected], pad_id)
