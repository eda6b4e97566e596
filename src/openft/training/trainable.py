"""What trains: split a vision-language model into vision tower, projector and language model,
and decide which weights (or LoRA adapters) train.

Which parameter is which part is one fact per architecture, kept in the family registry
(:mod:`openft.models.families`: ``vision_tower_prefixes``, ``projector_prefixes``...); this module
asks the model's family (``find_family(model).component(name)``) and never guesses from names.
A model of no vision family (a text model) is all language model.

Why by module path: LoRA's usual ``target_modules`` are bare names (``q_proj``, ``gate_proj``...)
that peft matches as suffixes anywhere in the model, and vision encoders reuse them (Qwen2.5-VL's
vision blocks have ``mlp.gate_proj/up_proj/down_proj``; Qwen2-VL's have ``attn.qkv``,
``attn.proj``, ``mlp.fc1/fc2``). So we expand the names into full module paths inside the
language model only, and add the vision tower or projector when asked.

The output head (``lm_head``) and anything the family does not name count as the language model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from openft.errors import InvalidRequest
from openft.models.families import Family, find_family
from openft.training.config import LoraConfig

Part = Literal["vision_tower", "projector", "language_model"]
PARTS: tuple[Part, ...] = ("language_model", "projector", "vision_tower")


def part_of(name: str, family: Family | None) -> Part:
    """Which part a parameter or module path (``model.visual.blocks.0.attn.qkv``) of a model of
    ``family`` (``find_family(model)``; None: a text model) belongs to."""
    if family is None:
        return "language_model"
    component = family.component(name)
    return component if component in ("vision_tower", "projector") else "language_model"


def lora_plan(
    model: nn.Module, lora: LoraConfig, *, train_vision_tower: bool, train_projector: bool
) -> LoraConfig:
    """``lora`` with ``target_modules`` expanded to full module paths, ready for ``apply_lora``.

    - Language model: linear layers whose name ends with one of ``lora.target_modules``.
    - ``train_vision_tower``: every linear layer of the vision tower as well.
    - ``train_projector``: the projector's root module(s) join ``modules_to_save`` (trained in
      full and saved with the adapter).

    Raises ``InvalidRequest`` when no language-model layer matches the target names.
    """
    family = find_family(model)
    targets: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        part = part_of(name, family)
        if part == "language_model" and any(name == t or name.endswith("." + t) for t in lora.target_modules):
            targets.append(name)
        elif part == "vision_tower" and train_vision_tower:
            targets.append(name)
    if not any(part_of(t, family) == "language_model" for t in targets):
        raise InvalidRequest(
            f"no language-model layer of this base model is named like the LoRA targets "
            f"{list(lora.target_modules)}; pick target modules the model has",
            param="model",
        )
    to_save = list(lora.modules_to_save)
    if train_projector:
        roots = projector_roots(model)
        if not roots:
            raise InvalidRequest(
                "train_projector was asked for but this base model has no vision projector", param="model"
            )
        for root in roots:
            # peft cannot wrap a ModuleList (Qwen3-VL's DeepStack mergers): its members are saved instead.
            module = model.get_submodule(root)
            names = (
                [f"{root}.{child}" for child, _ in module.named_children()]
                if isinstance(module, nn.ModuleList)
                else [root]
            )
            to_save += [n for n in names if n not in to_save]
    return dataclasses.replace(lora, target_modules=tuple(targets), modules_to_save=tuple(to_save))


def projector_roots(model: nn.Module) -> list[str]:
    """Paths of the outermost projector modules (``model.visual.merger``), in model order."""
    family = find_family(model)
    roots: list[str] = []
    for name, _ in model.named_modules():
        if name and part_of(name, family) == "projector" and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    return roots


def set_full_trainable(model: nn.Module, *, train_vision_tower: bool) -> None:
    """Full fine-tuning: language model and projector train; the vision tower only if asked."""
    family = find_family(model)
    for name, p in model.named_parameters():
        p.requires_grad_(train_vision_tower or part_of(name, family) != "vision_tower")


def parameter_counts(model: nn.Module) -> dict[Part, tuple[int, int]]:
    """``{part: (trainable, total)}`` parameter counts; LoRA weights count toward their part.
    peft's frozen ``original_module`` twin of a ``modules_to_save`` module is not counted twice."""
    family = find_family(model)
    counts: dict[Part, list[int]] = {p: [0, 0] for p in PARTS}
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        c = counts[part_of(name, family)]
        c[1] += p.numel()
        if p.requires_grad:
            c[0] += p.numel()
    return {p: (t, n) for p, (t, n) in counts.items()}


def describe_trainable(model: Any, *, lora: bool) -> str:
    """One line for the job's events, e.g. ``training (LoRA) language model 0.4M of 2.1M, ...``."""
    counts = parameter_counts(model)
    shown = [
        f"{part.replace('_', ' ')} {_human(t)} of {_human(n)}" for part, (t, n) in counts.items() if n > 0
    ]
    kind = "LoRA" if lora else "full fine-tuning"
    total = sum(t for t, _ in counts.values())
    return f"trainable parameters ({kind}): {_human(total)} - " + ", ".join(shown)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)
