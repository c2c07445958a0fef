"""LoRA adapters through ``peft``, with FlagEmbedding's option names (``--use-lora``,
``--lora-rank``, ``--lora-alpha``, ``--lora-dropout``, ``--target-modules``,
``--modules-to-save``, ``--from-peft``, ``--save-merged-lora-model``).

A LoRA model is the base model's weights, frozen, plus low-rank updates ``W + (alpha / r) B A``
on the target modules: only ``A`` and ``B`` (and ``--modules-to-save``) train, so optimizer
state, gradients and checkpoints are a small fraction of a full fine-tune's. Saved, the
adapter is a folder of ``adapter_config.json`` + ``adapter_model.safetensors`` that names its
base model; transformers, sentence-transformers and embtune load it with the base. The merged
model (``--save-merged-lora-model``) is a plain model with the updates added into ``W``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embtune.errors import UsageError

ADAPTER_CONFIG = "adapter_config.json"
# FlagEmbedding's default targets (decoder_only/base/arguments.py): attention and MLP
# projections of Llama, Qwen2/3, Mistral and Gemma.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """What ``--use-lora`` puts on the model."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=list)  # empty: default_targets(model)
    modules_to_save: list[str] = field(default_factory=list)


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` is a local folder holding a PEFT adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``)."""
    config_file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config_file}: cannot read the adapter's config: {exc}") from exc
    if not base:
        raise UsageError(f"{config_file}: no base_model_name_or_path: which model it adapts")
    return str(base)


def default_targets(model: torch.nn.Module) -> list[str]:
    """FlagEmbedding's projections where the model has them (decoder LLMs), else every linear
    layer (peft's ``all-linear``: BERT's query/key/value/dense)."""
    linear = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    names = {name.rsplit(".", 1)[-1] for name in linear}
    found = [p for p in DECODER_PROJECTIONS if p in names]
    return found or ["all-linear"]


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """``model`` wrapped in fresh LoRA adapters (peft's PeftModel); only they train."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = settings.target_modules or default_targets(model)
    config = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        modules_to_save=settings.modules_to_save or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"--target-modules {' '.join(targets)}: {first}") from exc


def load_adapter(model: torch.nn.Module, folder: str | Path, trainable: bool) -> torch.nn.Module:
    """``model`` with the adapter saved in ``folder`` (trainable to go on training it)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a model carrying peft adapters."""
    return hasattr(model, "peft_config")


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model: a copy of ``model`` with its adapters added into the base
    weights (``model`` keeps training untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def save_adapter(
    model: torch.nn.Module, folder: Path, base: str, state_dict: dict | None = None
) -> None:
    """The adapter's files in ``folder``, naming ``base`` (absolute when it is a local folder,
    so the adapter loads from any working directory). ``state_dict``: the model's full
    weights when it is sharded (peft takes the adapter's from it)."""
    local = Path(base)
    named = str(local.resolve()) if local.is_dir() else base
    for config in model.peft_config.values():
        config.base_model_name_or_path = named
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)


def trainable_summary(model: torch.nn.Module) -> str:
    """``trainable 1.2M of 494M parameters (0.24%)``: what LoRA leaves to train."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"trainable {_count(trained)} of {_count(total)} parameters "
        f"({100 * trained / max(total, 1):.2f}%)"
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
