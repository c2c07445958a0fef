"""Contrastive loss over a query's group and, by default, every other passage in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ContrastiveOutput:
    """The loss plus what the logs need to explain it."""

    loss: torch.Tensor
    scores: torch.Tensor  # [B, P] q.p / temperature, non-candidates at -inf
    candidates: torch.Tensor  # [B] how many passages each query was scored against


def contrastive_loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    positive_index: torch.Tensor,
    passage_owner: torch.Tensor,
    temperature: float,
    in_batch_negatives: bool = True,
    false_negative_mask: torch.Tensor | None = None,
) -> ContrastiveOutput:
    r"""InfoNCE / multiple-negatives ranking loss with hard negatives.

    For query :math:`q_b` with positive :math:`p_b^+` and candidate set :math:`C_b`:

    .. math::

        s(q, p) = \frac{q \cdot p}{\tau}, \qquad
        \mathcal{L} = -\frac{1}{B} \sum_b \log
        \frac{\exp s(q_b, p_b^+)}{\sum_{p \in C_b} \exp s(q_b, p)}

    :math:`C_b` is the query's own group (its positive and ``train_group_size - 1`` negatives)
    plus, when ``in_batch_negatives``, every other passage of the batch (other queries'
    positives and negatives). Passages flagged in ``false_negative_mask`` (texts that are one of
    the query's own positives) are removed from :math:`C_b`. Chance level is
    :math:`\ln |C_b|`: the loss of a model that scores every candidate the same.

    Args:
        query_emb: [B, H] query embeddings.
        passage_emb: [P, H] passages of all groups, concatenated.
        positive_index: [B] column in ``passage_emb`` of each query's positive.
        passage_owner: [P] index of the query whose group each passage comes from.
        temperature: :math:`\tau`; lower values sharpen the softmax.
        in_batch_negatives: score against the whole batch, not only the own group.
        false_negative_mask: optional [B, P] bool, True = exclude from that query's candidates.
    """
    scores = query_emb.float() @ passage_emb.float().T / temperature
    batch = torch.arange(query_emb.shape[0], device=scores.device)
    if in_batch_negatives:
        candidate = torch.ones_like(scores, dtype=torch.bool)
    else:
        candidate = passage_owner.unsqueeze(0) == batch.unsqueeze(1)
    if false_negative_mask is not None:
        candidate = candidate & ~false_negative_mask
    candidate[batch, positive_index] = True
    scores = scores.masked_fill(~candidate, float("-inf"))
    loss = F.cross_entropy(scores, positive_index)
    return ContrastiveOutput(loss=loss, scores=scores, candidates=candidate.sum(1))
