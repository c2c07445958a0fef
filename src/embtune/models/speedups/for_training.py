"""The speed and memory measures every model kind applies before training: the same results,
computed faster or with less kept for backward (each measure's module says how it is proved)."""

from __future__ import annotations

import torch

from embtune.config import TrainConfig
from embtune.models.speedups.activation_recompute import (
    recompute_feed_forward_activations,
    recompute_norm_outputs,
    share_attention_input_cast,
)
from embtune.models.speedups.dropout import use_fast_cpu_dropout


def apply_training_speedups(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> None:
    """Gradient checkpointing when asked; on a CPU the fast dropout and activation recompute."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cpu" and config.attn_implementation == "sdpa":
        # Same dropout, drawn and applied without the unfused attention path
        # (models/speedups/dropout.py).
        use_fast_cpu_dropout(model)
    if device.type == "cpu" and not (config.fp16 or config.gradient_checkpointing):
        # Same results, less kept for backward: cheap activations are recomputed instead
        # (models/speedups/activation_recompute.py), in fp32 and in bf16 autocast.
        recompute_feed_forward_activations(model)
        recompute_norm_outputs(model)
        share_attention_input_cast(model)
