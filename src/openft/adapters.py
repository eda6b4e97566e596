"""The only peft glue: apply, save, load and merge LoRA adapters.

Shared by training and inference (which may not import each other), so it sits low in the layer
stack. ``apply_lora`` takes any object with LoRA fields (``training.config.LoraConfig`` in
practice) so this module does not import ``training``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model


class LoraSpec(Protocol):
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]


def apply_lora(model: Any, cfg: LoraSpec) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only adapter (and ``modules_to_save``) weights train."""
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
    )
    return get_peft_model(model, peft_cfg)


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    model.save_pretrained(str(directory))


def load_adapter(base_model: Any, directory: Path, *, trainable: bool = False) -> PeftModel:
    """Attach the adapter saved in ``directory`` to ``base_model``."""
    return PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)


def attach_adapter(model: Any, directory: Path, *, name: str) -> PeftModel:
    """Add the adapter in ``directory`` to ``model`` under ``name`` (wrapping a plain model the
    first time) for inference; rows pick adapters per forward with ``adapter_names``."""
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, str(directory), adapter_name=name)
    model.eval()
    return model


def detach_adapter(model: PeftModel, *, name: str) -> None:
    """Free an attached adapter's weights (it must not be the only one, nor in use)."""
    model.delete_adapter(name)


def merge(model: Any) -> Any:
    """Fold LoRA weights into the base weights and return the plain transformers model."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def is_adapter_dir(directory: Path) -> bool:
    return (Path(directory) / "adapter_config.json").exists()
