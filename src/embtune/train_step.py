"""One training step's forward and backward pass: plain, cached (GradCache), cross-device.

Plain: queries and passages are encoded with the autograd graph kept, the loss is computed and
back-propagated. Activation memory grows with batch size x group size x passage length.

Cached (``--cache-chunk-size N``, GradCache, Gao et al. 2021): (1) encode the whole batch in
chunks of N texts without a graph, remembering the random state before each chunk; (2) compute
the loss and its gradient with respect to every embedding; (3) encode each chunk again with a
graph, replaying its random state so dropout is the same, and back-propagate the stored
embedding gradient through it. The parameter gradient equals the plain one for the same dropout
masks; memory holds one chunk's activations, so the batch is bound by time, not memory. Cost:
one extra forward pass without a graph (about a third more compute).

Cross-device (``--negatives-cross-device``, under torchrun / accelerate launch): passage
embeddings of all processes are gathered (:mod:`embtune.distributed`), so each query is scored
against the whole global batch; gradients flow back to the process that encoded each passage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from embtune.data.batching import Batch
from embtune.distributed import (
    gather,
    gather_sizes,
    gather_with_grad,
    is_distributed,
    sum_over_processes,
)
from embtune.losses import ContrastiveOutput, contrastive_loss


@dataclass
class StepOutput:
    """The loss (this process's queries) and what the logs need from the scores."""

    loss: torch.Tensor  # detached
    output: ContrastiveOutput
    positive_index: torch.Tensor  # [B] positive columns of ``output.scores``
    finite: bool  # False: the loss was not finite and nothing was back-propagated
    padded_tokens: int  # token positions encoded (padding included), this process
    real_tokens: int  # of which real tokens


@dataclass
class StepSettings:
    """The options that shape a step (taken from TrainConfig)."""

    temperature: float
    in_batch_negatives: bool = True
    negatives_cross_device: bool = False
    cache_chunk_size: int = 0


def _chunks(ids: torch.Tensor, mask: torch.Tensor, size: int) -> Iterator[tuple[slice, ...]]:
    """(rows, ids, mask) per chunk of ``size`` texts, without the padding columns no text of
    the chunk uses (a chunk of short texts is narrower than the batch)."""
    lengths = mask.sum(1).tolist()  # one device sync for all chunks
    for start in range(0, ids.shape[0], size):
        rows = slice(start, start + size)
        width = max(max(lengths[rows], default=1), 1)
        yield rows, ids[rows, :width], mask[rows, :width]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _false_negative_mask(batch: Batch, passage_ids: torch.Tensor) -> torch.Tensor:
    """[B, P] True where passage ``p`` (any process's) is one of query ``b``'s positives."""
    ids = passage_ids.cpu().numpy()
    mask = (
        np.stack([np.isin(ids, pos) for pos in batch.positive_ids])
        if batch.positive_ids
        else (np.zeros((0, len(ids)), dtype=bool))
    )
    return torch.from_numpy(mask).to(passage_ids.device)


def _loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    batch: Batch,
    settings: StepSettings,
    gather_passages: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None,
) -> tuple[ContrastiveOutput, torch.Tensor, torch.Tensor]:
    """Loss of this process's queries; returns (output, positive columns, passages scored)."""
    if gather_passages is None:
        out = contrastive_loss(
            query_emb,
            passage_emb,
            batch.positive_index,
            batch.passage_owner,
            settings.temperature,
            settings.in_batch_negatives,
            batch.false_negative_mask,
        )
        return out, batch.positive_index, passage_emb
    every_passage, first = gather_passages(passage_emb)
    passage_ids, _ = gather(batch.passage_ids)
    owners, _ = gather(batch.passage_owner + _query_offset(batch))
    positive_index = batch.positive_index + first
    out = contrastive_loss(
        query_emb,
        every_passage,
        positive_index,
        owners,
        settings.temperature,
        settings.in_batch_negatives,
        _false_negative_mask(batch, passage_ids),
        query_index=torch.arange(len(batch.rows), device=query_emb.device) + _query_offset(batch),
    )
    return out, positive_index, every_passage


def _query_offset(batch: Batch) -> int:
    """Index of this process's first query in the global batch (cached per batch)."""
    if batch.query_offset is None:
        sizes = gather_sizes(len(batch.rows), batch.positive_index.device)
        batch.query_offset = sum(sizes[: torch.distributed.get_rank()])
    return batch.query_offset


def forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    settings: StepSettings,
    backward: Callable[[torch.Tensor], None],
    finite: Callable[[torch.Tensor], bool],
    loss_weight: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepOutput:
    """Encode ``batch``, compute the contrastive loss and back-propagate it into ``model``.

    ``backward(loss)`` is the accelerator's (it scales fp16 losses); ``finite(loss)`` decides,
    on every process alike, whether the step goes on; ``loss_weight`` rescales this process's
    mean loss so that DDP's average over processes is the mean over the global batch when
    processes hold different numbers of queries; ``no_sync()`` suspends DDP's gradient
    all-reduce for all but the last of several backward passes (cached loss).
    """
    cross = settings.negatives_cross_device and is_distributed()
    tokens = (
        batch.query_input_ids.numel() + batch.passage_input_ids.numel(),
        int(batch.query_attention_mask.sum() + batch.passage_attention_mask.sum()),
    )
    if not settings.cache_chunk_size:
        query_emb = model(batch.query_input_ids, batch.query_attention_mask)
        passage_emb = model(batch.passage_input_ids, batch.passage_attention_mask)
        out, positive_index, _ = _loss(
            query_emb, passage_emb, batch, settings, gather_with_grad if cross else None
        )
        ok = finite(out.loss)
        if ok:
            backward(out.loss * loss_weight)
        return StepOutput(out.loss.detach(), out, positive_index, ok, *tokens)
    return _cached_forward_backward(
        model, batch, settings, backward, finite, loss_weight, no_sync, cross, tokens
    )


def _cached_forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    settings: StepSettings,
    backward: Callable[[torch.Tensor], None],
    finite: Callable[[torch.Tensor], bool],
    loss_weight: float,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None,
    cross: bool,
    tokens: tuple[int, int],
) -> StepOutput:
    device = batch.query_input_ids.device
    size = settings.cache_chunk_size
    parts = [
        (batch.query_input_ids, batch.query_attention_mask),
        (batch.passage_input_ids, batch.passage_attention_mask),
    ]
    # (1) embeddings without a graph, remembering the random state of each chunk.
    plan: list[tuple[int, slice, torch.Tensor, torch.Tensor, tuple]] = []
    embeddings: list[list[torch.Tensor]] = [[], []]
    padded = 0
    with torch.no_grad():
        for which, (ids, mask) in enumerate(parts):
            for rows, chunk_ids, chunk_mask in _chunks(ids, mask, size):
                padded += chunk_ids.numel()
                state = _rng_state(device)
                embeddings[which].append(model(chunk_ids, chunk_mask))
                plan.append((which, rows, chunk_ids, chunk_mask, state))
    after_first_pass = _rng_state(device)
    leaves = [
        torch.cat(e).detach().requires_grad_() if e else torch.empty(0, device=device)
        for e in embeddings
    ]
    # (2) loss and its gradient with respect to every embedding.
    gather_leaf = None
    if cross:

        def gather_leaf(passages: torch.Tensor) -> tuple[torch.Tensor, int]:
            every, first = gather(passages.detach())
            every.requires_grad_()
            gather_leaf.every, gather_leaf.first = every, first  # type: ignore[attr-defined]
            return every, first

    out, positive_index, _ = _loss(leaves[0], leaves[1], batch, settings, gather_leaf)
    ok = finite(out.loss)
    if not ok:
        _set_rng_state(after_first_pass, device)
        return StepOutput(out.loss.detach(), out, positive_index, False, padded, tokens[1])
    backward(out.loss * loss_weight)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    if cross:
        # Other processes' losses depend on our passages too: add their gradients.
        every_grad = sum_over_processes(gather_leaf.every.grad)  # type: ignore[attr-defined]
        first = gather_leaf.first  # type: ignore[attr-defined]
        grads[1] = every_grad[first : first + leaves[1].shape[0]]
    # (3) each chunk again, with a graph and the same dropout, back-propagating its gradient.
    for number, (which, rows, chunk_ids, chunk_mask, state) in enumerate(plan):
        _set_rng_state(state, device)
        last = number == len(plan) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            emb = model(chunk_ids, chunk_mask)
            torch.autograd.backward(emb, grads[which][rows].to(emb.dtype))
    _set_rng_state(after_first_pass, device)
    return StepOutput(out.loss.detach(), out, positive_index, True, padded, tokens[1])
