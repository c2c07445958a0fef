"""Cross-device negatives: every process scores its queries against the passages of all.

Under ``torchrun`` / ``accelerate launch`` each process encodes its share of the global batch.
With ``--negatives-cross-device`` the passage embeddings of all processes are gathered, so a
query is scored against every passage of the global batch, and the gradient of each process's
loss flows back to the process that encoded the passage.

Why a hand-written autograd function: ``torch.distributed.nn.functional.all_gather`` implements
its backward with all-to-all, which the gloo backend (CPU) lacks, and it needs equal sizes on
every process, which the last batch of an epoch does not have. Here the backward is one
all-reduce of the (small) embedding gradient, which every backend has.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from embtune.data.batching import GroupLayout, false_negative_mask

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_sizes(count: int, device: torch.device) -> list[int]:
    """``count`` of every process, in rank order."""
    mine = torch.tensor([count], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenation of every process's ``tensor`` (first dimensions ``sizes``)."""
    width = max(sizes)
    padded = tensor.new_zeros((width, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # noqa: ANN001
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        # Every process's loss depends on our rows: their gradients add up.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows of ``tensor`` (rank order) and where this process's rows start.

    Gradients reaching the gathered tensor on any process flow back to the process that owns
    the rows (summed over processes).
    """
    sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes), sum(sizes[: dist.get_rank()])


def gather(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows of ``tensor`` (no gradient) and where this process's rows start."""
    sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _gather_padded(tensor, sizes), sum(sizes[: dist.get_rank()])


def gather_layout(layout: GroupLayout) -> GroupLayout:
    """This process's queries laid out against the passages of every process.

    Passage columns, owners and ids become global (rank order, as :func:`gather_with_grad`
    concatenates the passages); queries stay this process's, numbered by their place in the
    global batch; a passage of another process that is one of our query's positives is a false
    negative, as it would be in one process.
    """
    passage_ids, first_passage = gather(layout.passage_ids)
    device = layout.positive_index.device
    first_query = sum(gather_sizes(layout.queries, device)[: dist.get_rank()])
    owners, _ = gather(layout.passage_owner + first_query)
    mask = false_negative_mask(passage_ids.cpu().numpy(), layout.positive_ids)
    # Every process joins the gather, also one whose groups have no scores (NaN, as a single
    # process lays out a group without scores).
    scores = layout.teacher_scores
    if scores is None:
        scores = torch.full(layout.passage_ids.shape, float("nan"), device=device)
    scores, _ = gather(scores.to(device))
    return GroupLayout(
        positive_index=layout.positive_index + first_passage,
        passage_owner=owners,
        false_negative_mask=torch.from_numpy(mask).to(device),
        passage_ids=passage_ids,
        positive_ids=layout.positive_ids,
        query_index=torch.arange(layout.queries, device=device) + first_query,
        teacher_scores=None if torch.isnan(scores).all() else scores,
    )


def end_distributed(accelerator: Accelerator) -> None:
    """End the run on every process together, then close trackers and the process group.

    No process leaves while the main one still writes. The pause first fixes a hang at exit
    (two-process CPU runs, two at a time: 6 of 90 hung before, 0 of 180 after; torch 2.13,
    gloo): the process group's worker threads release a finished collective's tensors under
    the GIL, and when the process group was torn down right after a collective whose tensors
    were not yet released, the teardown (holding the GIL) and the worker (waiting for it)
    waited on each other forever. Sleeping hands the GIL over so that the last collectives
    are released; the barrier after it then holds no Python tensor.
    """
    if accelerator.num_processes > 1:
        time.sleep(0.1)
        accelerator.wait_for_everyone()
    try:
        accelerator.end_training()
    except OSError as exc:
        # Closing TensorBoard flushes its last events; on a full disk they are lost, but the
        # run's own outcome (its model, or the stop that brought us here) must be what is seen.
        log.warning("TensorBoard events not flushed: %s", exc.strerror or exc)
