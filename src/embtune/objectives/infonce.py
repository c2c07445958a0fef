"""InfoNCE: contrastive loss over a query's group and, by default, every other passage in the
batch (FlagEmbedding's and sentence-transformers' MultipleNegativesRankingLoss), with the
signals that explain it (accuracy, similarities by kind, candidates, chance level).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embtune.data.batching import GroupLayout, own_group_mask
from embtune.objectives.base import ObjectiveOutput


@dataclass
class ContrastiveOutput:
    """The loss plus what the logs need to explain it."""

    loss: torch.Tensor
    scores: torch.Tensor  # [B, P] q.p / temperature, non-candidates at -inf
    candidates: torch.Tensor  # [B] how many passages each query was scored against
    own_group: torch.Tensor  # [B, P] True where the passage is from the query's own group
    masked: torch.Tensor  # [B, P] True where a false negative was taken out of the softmax


def contrastive_loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    positive_index: torch.Tensor,
    passage_owner: torch.Tensor,
    temperature: float,
    in_batch_negatives: bool = True,
    false_negative_mask: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
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
        query_index: [B] the number ``passage_owner`` uses for each query (default 0..B-1; with
            cross-device negatives, the query's place in the global batch).
    """
    scores = query_emb.float() @ passage_emb.float().T / temperature
    batch = torch.arange(query_emb.shape[0], device=scores.device)
    own_group = own_group_mask(passage_owner, query_index, query_emb.shape[0])
    candidate = torch.ones_like(scores, dtype=torch.bool) if in_batch_negatives else own_group
    masked = torch.zeros_like(candidate)
    if false_negative_mask is not None:
        masked = candidate & false_negative_mask
        masked[batch, positive_index] = False
        candidate = candidate & ~masked
    candidate[batch, positive_index] = True
    scores = scores.masked_fill(~candidate, float("-inf"))
    loss = F.cross_entropy(scores, positive_index)
    return ContrastiveOutput(
        loss=loss,
        scores=scores,
        candidates=candidate.sum(1),
        own_group=own_group,
        masked=masked,
    )


def batch_signals(
    out: ContrastiveOutput, positive_index: torch.Tensor, temperature: float
) -> dict[str, float]:
    """What one step's scores say beyond the loss (summed over the batch's queries).

    Returned as sums plus ``queries`` so that windows of steps (and processes) add up exactly:
    ``correct`` (queries whose positive scored above every other candidate: in-batch top-1
    accuracy), the similarity q.p of positives, hard negatives (own group) and in-batch
    negatives (other groups), the candidate counts by kind, and the false negatives masked out
    of the softmax.
    """
    with torch.no_grad():
        scores = out.scores.detach()
        batch = torch.arange(scores.shape[0], device=scores.device)
        candidate = torch.isfinite(scores)
        similarity = torch.where(candidate, scores * temperature, torch.zeros_like(scores))
        is_positive = torch.zeros_like(candidate)
        is_positive[batch, positive_index] = True
        hard = candidate & out.own_group & ~is_positive
        in_batch = candidate & ~out.own_group
        # Strictly above every other candidate: a tie does not count as ranked first.
        correct = (
            scores[batch, positive_index]
            > scores.masked_fill(is_positive, float("-inf")).max(1).values
        )
        sums = {
            "correct": correct.sum(),
            "positive_similarity": similarity[batch, positive_index].sum(),
            "hard_negative_similarity": (similarity * hard).sum(),
            "hard_negatives": hard.sum(),
            "in_batch_negative_similarity": (similarity * in_batch).sum(),
            "in_batch_negatives": in_batch.sum(),
            "candidates": candidate.sum(),
            "masked_false_negatives": out.masked.sum(),
        }
        # One transfer for all of them (a GPU waits once, not once per number).
        values = torch.stack([v.float() for v in sums.values()]).tolist()
        return {"queries": float(scores.shape[0]), **dict(zip(sums, values, strict=True))}


def window_signals(sums: dict[str, float]) -> dict[str, float]:
    """Turn :func:`batch_signals` sums over a logging window into the logged means."""
    queries = sums.get("queries", 0.0)
    if not queries:
        return {}

    def mean(total: str, count: str) -> float | None:
        return sums[total] / sums[count] if sums.get(count) else None

    signals = {
        "accuracy": sums["correct"] / queries,
        "positive_similarity": sums["positive_similarity"] / queries,
        "hard_negative_similarity": mean("hard_negative_similarity", "hard_negatives"),
        "in_batch_negative_similarity": mean("in_batch_negative_similarity", "in_batch_negatives"),
        "candidates_per_query": sums["candidates"] / queries,
        "hard_negatives_per_query": sums["hard_negatives"] / queries,
        "in_batch_negatives_per_query": sums["in_batch_negatives"] / queries,
        "masked_false_negatives": sums["masked_false_negatives"],
    }
    return {k: v for k, v in signals.items() if v is not None}


@dataclass
class InfoNCE:
    r"""The bi-encoder's contrastive objective: :func:`contrastive_loss` as an objective.

    Inputs: representations ``queries`` [B, H] and ``passages`` [P, H] (with cross-device
    negatives, every process's passages), and the batch layout (positives, group owners,
    false negatives). Formula: :func:`contrastive_loss`; chance level :math:`\ln |C_b|`, the
    mean candidate count of the window. Use it for any query/passage retrieval data with
    positives and (hard) negatives; ``temperature`` is ``--temperature``.
    """

    temperature: float
    in_batch_negatives: bool = True
    name: str = "infonce"

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The loss of this process's queries against every candidate passage."""
        out = contrastive_loss(
            representations["queries"],
            representations["passages"],
            layout.positive_index,
            layout.passage_owner,
            self.temperature,
            self.in_batch_negatives,
            layout.false_negative_mask,
            query_index=layout.query_index,
        )
        return ObjectiveOutput(
            loss=out.loss,
            terms={self.name: out.loss},
            signal_sums=lambda: batch_signals(out, layout.positive_index, self.temperature),
            details=out,
        )

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """Chance level ln(candidates), loss over chance, then :func:`window_signals`."""
        means = window_signals(dict(sums))
        candidates = means.get("candidates_per_query", 1.0)
        return {
            "chance_loss": math.log(candidates),
            "loss_over_chance": loss / math.log(candidates) if candidates > 1 else None,
            **means,
        }
