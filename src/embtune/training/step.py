"""Step strategies: one training step's forward and backward pass, plain or cached (GradCache),
each optionally with cross-device negatives. They know neither the objective nor the model kind:
they encode a batch's parts with ``model(input_ids, attention_mask)``, hand the representations
and the layout to the objective, and back-propagate its loss.

Plain: every part is encoded with the autograd graph kept, the loss is computed and
back-propagated. Activation memory grows with batch size x group size x passage length.

Cached (``--cache-chunk-size N``, GradCache, Gao et al. 2021): (1) encode every part in chunks
of N texts without a graph, remembering the random state before each chunk; (2) compute the
loss and its gradient with respect to every representation; (3) encode each chunk again with a
graph, replaying its random state so dropout is the same, and back-propagate the stored
gradient through it. The parameter gradient equals the plain one for the same dropout masks;
memory holds one chunk's activations, so the batch is bound by time, not memory. Cost: one
extra forward pass without a graph (about a third more compute).

Cross-device (``--negatives-cross-device``, under torchrun / accelerate launch): the parts the
model kind names as shared (a bi-encoder's passages) are gathered from every process
(:mod:`embtune.distributed`) and the layout with them, so each query is scored against the
whole global batch; gradients flow back to the process that encoded each row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from embtune.data.batching import Batch, TokenBatch
from embtune.distributed import gather_layout, gather_with_grad, is_distributed
from embtune.objectives.base import Objective, ObjectiveOutput


@dataclass
class StepOutput:
    """The loss (this process's queries) and the objective's output for the log."""

    loss: torch.Tensor  # detached
    output: ObjectiveOutput
    finite: bool  # False: the loss was not finite and nothing was back-propagated
    padded_tokens: int  # token positions encoded (padding included), this process
    real_tokens: int  # of which real tokens


@dataclass
class StepSettings:
    """The options that shape a step (taken from TrainConfig and the model kind)."""

    cache_chunk_size: int = 0
    pad_to_multiple_of: int = 1
    negatives_cross_device: bool = False
    shared_parts: tuple[str, ...] = ()  # parts gathered across processes (cross-device)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _encode(model: torch.nn.Module, part: TokenBatch) -> torch.Tensor:
    if part.token_type_ids is None:
        return model(part.input_ids, part.attention_mask)
    return model(part.input_ids, part.attention_mask, part.token_type_ids)


def _objective(
    objective: Objective,
    representations: dict[str, torch.Tensor],
    batch: Batch,
    settings: StepSettings,
) -> ObjectiveOutput:
    """The objective on this process's representations, or with cross-device negatives on the
    shared parts of every process."""
    layout = batch.layout
    if settings.negatives_cross_device and is_distributed():
        representations = {
            name: gather_with_grad(rep)[0] if name in settings.shared_parts else rep
            for name, rep in representations.items()
        }
        layout = gather_layout(layout)
    return objective(representations, layout)


def forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    objective: Objective,
    settings: StepSettings,
    backward: Callable[[torch.Tensor], None],
    finite: Callable[[torch.Tensor], bool],
    loss_weight: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepOutput:
    """Encode ``batch``, compute ``objective``'s loss and back-propagate it into ``model``.

    ``backward(loss)`` is the accelerator's (it scales fp16 losses); ``finite(loss)`` decides,
    on every process alike, whether the step goes on; ``loss_weight`` rescales this process's
    mean loss so that DDP's average over processes is the mean over the global batch when
    processes hold different numbers of queries; ``no_sync()`` suspends DDP's gradient
    all-reduce for all but the last of several backward passes (cached loss).
    """
    if settings.cache_chunk_size:
        return _cached_forward_backward(
            model, batch, objective, settings, backward, finite, loss_weight, no_sync
        )
    # Parts in the batch's order: a bi-encoder's passages first, whose large activations then
    # take the allocator's free memory in one piece (peak CPU memory ~0.4 GiB lower,
    # docs/performance.md).
    representations = {name: _encode(model, part) for name, part in batch.parts.items()}
    out = _objective(objective, representations, batch, settings)
    ok = finite(out.loss)
    if ok:
        backward(out.loss * loss_weight)
    return StepOutput(out.loss.detach(), out, ok, batch.padded_tokens, batch.real_tokens)


def _cached_forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    objective: Objective,
    settings: StepSettings,
    backward: Callable[[torch.Tensor], None],
    finite: Callable[[torch.Tensor], bool],
    loss_weight: float,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None,
) -> StepOutput:
    device = next(iter(batch.parts.values())).input_ids.device
    real_tokens = batch.real_tokens
    # (1) representations without a graph, remembering the random state of each chunk.
    plan: list[tuple[str, slice, TokenBatch, tuple]] = []
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in batch.parts}
    padded = 0
    with torch.no_grad():
        for name, part in batch.parts.items():
            for rows, chunk in part.chunks(settings.cache_chunk_size, settings.pad_to_multiple_of):
                padded += chunk.padded_tokens
                state = _rng_state(device)
                pieces[name].append(_encode(model, chunk))
                plan.append((name, rows, chunk, state))
    after_first_pass = _rng_state(device)
    leaves = {
        name: torch.cat(p).detach().requires_grad_() if p else torch.empty(0, device=device)
        for name, p in pieces.items()
    }
    # (2) loss and its gradient with respect to every representation (with cross-device
    # negatives, the gather's backward adds the other processes' gradients for our rows).
    out = _objective(objective, leaves, batch, settings)
    ok = finite(out.loss)
    if not ok:
        _set_rng_state(after_first_pass, device)
        return StepOutput(out.loss.detach(), out, False, padded, real_tokens)
    backward(out.loss * loss_weight)
    grads = {
        name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        for name, leaf in leaves.items()
    }
    # (3) each chunk again, with a graph and the same dropout, back-propagating its gradient.
    for number, (name, rows, chunk, state) in enumerate(plan):
        _set_rng_state(state, device)
        last = number == len(plan) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            rep = _encode(model, chunk)
            torch.autograd.backward(rep, grads[name][rows].to(rep.dtype))
    _set_rng_state(after_first_pass, device)
    return StepOutput(out.loss.detach(), out, True, padded, real_tokens)
