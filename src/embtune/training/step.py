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

import torch
import torch.distributed as dist

from embtune.data.batching import Batch, false_negative_mask, padded_width
from embtune.distributed import gather, gather_sizes, gather_with_grad, is_distributed
from embtune.objectives.infonce import ContrastiveOutput, contrastive_loss


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
    pad_to_multiple_of: int = 1


def _chunks(
    ids: torch.Tensor, mask: torch.Tensor, size: int, multiple: int = 1
) -> Iterator[tuple[slice, ...]]:
    """(rows, ids, mask) per chunk of ``size`` texts, without the padding columns no text of
    the chunk uses (a chunk of short texts is narrower than the batch); widths are rounded up
    to ``multiple`` as the batch's were."""
    lengths = mask.sum(1).tolist()  # one device sync for all chunks
    for start in range(0, ids.shape[0], size):
        rows = slice(start, start + size)
        width = padded_width(max(lengths[rows], default=1), multiple, ids.shape[1])
        yield rows, ids[rows, :width], mask[rows, :width]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    batch: Batch,
    settings: StepSettings,
    cross_device: bool,
) -> tuple[ContrastiveOutput, torch.Tensor]:
    """Loss of this process's queries; returns (output, positive columns)."""
    if not cross_device:
        out = contrastive_loss(
            query_emb,
            passage_emb,
            batch.positive_index,
            batch.passage_owner,
            settings.temperature,
            settings.in_batch_negatives,
            batch.false_negative_mask,
        )
        return out, batch.positive_index
    every_passage, first = gather_with_grad(passage_emb)
    passage_ids, _ = gather(batch.passage_ids)
    # Queries are numbered across the global batch, in rank order.
    first_query = sum(gather_sizes(len(batch.rows), query_emb.device)[: dist.get_rank()])
    owners, _ = gather(batch.passage_owner + first_query)
    positive_index = batch.positive_index + first
    out = contrastive_loss(
        query_emb,
        every_passage,
        positive_index,
        owners,
        settings.temperature,
        settings.in_batch_negatives,
        torch.from_numpy(false_negative_mask(passage_ids.cpu().numpy(), batch.positive_ids)).to(
            query_emb.device
        ),
        query_index=torch.arange(len(batch.rows), device=query_emb.device) + first_query,
    )
    return out, positive_index


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
        # Passages first: their large activations then take the allocator's free memory in one
        # piece, and peak CPU memory is ~0.4 GiB lower (docs/performance.md).
        passage_emb = model(batch.passage_input_ids, batch.passage_attention_mask)
        query_emb = model(batch.query_input_ids, batch.query_attention_mask)
        out, positive_index = _loss(query_emb, passage_emb, batch, settings, cross)
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
        for which in (1, 0):  # passages first, as in the plain path (same dropout draws)
            ids, mask = parts[which]
            for rows, chunk_ids, chunk_mask in _chunks(
                ids, mask, size, settings.pad_to_multiple_of
            ):
                padded += chunk_ids.numel()
                state = _rng_state(device)
                embeddings[which].append(model(chunk_ids, chunk_mask))
                plan.append((which, rows, chunk_ids, chunk_mask, state))
    after_first_pass = _rng_state(device)
    leaves = [
        torch.cat(e).detach().requires_grad_() if e else torch.empty(0, device=device)
        for e in embeddings
    ]
    # (2) loss and its gradient with respect to every embedding (with cross-device negatives,
    # the gather's backward adds the other processes' gradients for our passages).
    out, positive_index = _loss(leaves[0], leaves[1], batch, settings, cross)
    ok = finite(out.loss)
    if not ok:
        _set_rng_state(after_first_pass, device)
        return StepOutput(out.loss.detach(), out, positive_index, False, padded, tokens[1])
    backward(out.loss * loss_weight)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
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
