"""The guarded update: a non-finite loss or gradient never reaches the weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from embtune.config import TrainConfig
from embtune.training.step import StepOutput

if TYPE_CHECKING:
    from accelerate import Accelerator


def finite_everywhere(accelerator: Any, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process: they must skip a step together."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def guarded_update(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    result: StepOutput,
    config: TrainConfig,
) -> str | None:
    """Clip and apply the step's gradients; the problem's name when the step was skipped.

    fp16 is the exception for gradients: there an overflow is the loss scaler's normal signal,
    and accelerate's GradScaler skips that update and lowers the scale by itself.
    """
    problem = None
    if not result.finite:
        problem = "non-finite loss"
    else:
        if config.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        elif not config.fp16:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        if not config.fp16 and not finite_everywhere(accelerator, grad_norm):
            problem = "non-finite gradient"
        else:
            optimizer.step()
    # The schedule follows the step count, skipped steps included, so that a step's learning
    # rate does not depend on how many steps before it were skipped.
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    return problem
