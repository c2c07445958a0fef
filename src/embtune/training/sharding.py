"""Sharded training (``--fsdp``): models too large for one device, through accelerate's FSDP.

Each process holds 1/N of every weight, gradient and optimizer state (PyTorch FSDP2,
``fully_shard``); a layer's full weights are gathered for its forward and backward and
dropped again after (``full_shard``) or kept until the backward (``shard_grad_op``: faster,
more memory). The layers wrapped are the model's own transformer blocks (its
``_no_split_modules``, the classes Hugging Face never splits across devices), as accelerate's
``transformer_based_wrap`` picks them.

Launch: ``torchrun --nproc_per_node 8 -m embtune train --fsdp full_shard ...``, or
``accelerate launch --use_fsdp --fsdp_version 2 ...`` (accelerate then builds the plugin from
its own configuration and ``--fsdp`` is not needed).

What changes under sharding, and why:
- Saving (the final model, checkpoints, ``best/``) gathers the full weights to the main
  process first: every process takes part (a collective), then the main one writes the same
  folder as an unsharded run. Checkpoints also hold accelerate's sharded copy of the model
  next to the optimizer state, which is what resuming restores.
- Dev and reference evaluations run on every process: each forward needs every process's
  shard, so each process encodes the whole dev set and gets the same metrics; the main one
  logs them.
- accelerate turns FSDP on only for accelerators (GPUs, NPUs, ...). PyTorch's FSDP2 itself
  also runs on CPU processes over gloo (every step, checkpoint and resume path is tested that
  way, with two processes), so a CPU launch is switched to FSDP here rather than silently
  trained unsharded with DDP.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from embtune.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from embtune.config import TrainConfig


def fsdp_plugin(config: TrainConfig) -> FullyShardedDataParallelPlugin | None:
    """accelerate's FSDP2 plugin for ``--fsdp`` (None when off)."""
    if config.fsdp == "off":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=config.fsdp == "full_shard",
        auto_wrap_policy="transformer_based_wrap",
        # Sharded checkpoints: no process ever holds the full optimizer state.
        state_dict_type="SHARDED_STATE_DICT",
        # Every process loads the weights itself (the same files), as an unsharded run does.
        cpu_ram_efficient_loading=False,
    )


def shard_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin | None) -> None:
    """Switch a multi-process CPU launch given an FSDP ``plugin`` to FSDP (see the module's
    note), as accelerate does for a GPU launch: the launch type in both of its shared states
    (the process group's and its own), the plugin and its mixed precision."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # `accelerate launch --use_fsdp`'s settings
    if plugin is None:
        return
    if plugin.fsdp_version != 2:
        # torch's FSDP1 refuses CPU processes ("Inconsistent compute device"); FSDP2 runs.
        raise UsageError(
            "FSDP version 1 does not run on CPU processes: use FSDP version 2 "
            "(--fsdp full_shard, or accelerate launch --use_fsdp --fsdp_version 2)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """True when the model is (or will be, once prepared) sharded with FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict | None:
    """The full weights of a sharded ``model`` on the main process (on the CPU), ``{}`` on the
    others; None when the model is not sharded. Every process must call it (a collective)."""
    if not is_sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)
