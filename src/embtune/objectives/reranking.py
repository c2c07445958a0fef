r"""Reranker objectives: a cross-encoder's pair logits over each query's group.

The batch holds, per query :math:`b`, its group :math:`G_b` (the positive first, then
``train_group_size - 1`` negatives) and the model's logit :math:`s_{bj}` of each pair. There are
no in-batch negatives: a pair is only ever scored with its own query. Passages of the group that
are one of the query's positives (the same text under another id) are taken out, as InfoNCE
takes them out.

* :class:`ListwiseCrossEntropy` (``--reranker-loss listwise``, the default): FlagEmbedding's
  reranker loss, cross-entropy over the group with the positive as the target.
* :class:`PointwiseBCE` (``pointwise``): sentence-transformers' BinaryCrossEntropyLoss, each pair
  a binary label (positive 1, negatives 0).
* Distillation (``--knowledge-distillation``): the objectives of objectives/distillation.py on
  the pair logits (:class:`~embtune.objectives.scores.PairScores`); ``kl_div`` adds the listwise
  term, as FlagEmbedding's reranker does.

Logged: chance level, top-1 accuracy within the group (the positive above every negative),
the mean positive and negative logits, and the margin between the positive and the best
negative (``score_margin``; above 0 when the positive ranks first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embtune.config import TrainConfig
from embtune.data.batching import GroupLayout
from embtune.objectives.base import Objective, ObjectiveOutput
from embtune.objectives.scores import PairScores, pair_score_matrix


def candidate_scores(pair_scores: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """[B, P] the pair logits of each query's own group, -inf elsewhere and for group passages
    that are one of the query's positives (its own positive always stays)."""
    scores = pair_score_matrix(pair_scores, layout)
    rows = torch.arange(layout.queries, device=scores.device)
    duplicate = layout.false_negative_mask.to(scores.device).clone()
    duplicate[rows, layout.positive_index] = False
    return scores.masked_fill(duplicate, float("-inf"))


def group_signals(scores: torch.Tensor, positive_index: torch.Tensor) -> dict[str, float]:
    """Sums over the step's queries of what explains a reranker's loss (one device transfer):
    top-1 correct, positive logit, negatives' logits and count, margin over the best negative."""
    with torch.no_grad():
        scores = scores.detach()
        rows = torch.arange(scores.shape[0], device=scores.device)
        positive = scores[rows, positive_index]
        negatives = scores.clone()
        negatives[rows, positive_index] = float("-inf")
        is_negative = torch.isfinite(negatives)
        best = negatives.max(1).values
        has_negative = is_negative.any(1)
        margin = torch.where(has_negative, positive - best, torch.zeros_like(positive))
        sums = {
            # Strictly above every negative: a tie does not count as ranked first.
            "correct": ((positive > best) | ~has_negative).sum(),
            "positive_score": positive.sum(),
            "negative_score": torch.where(is_negative, negatives, 0.0).sum(),
            "negatives": is_negative.sum(),
            "score_margin": margin.sum(),
            "with_negatives": has_negative.sum(),
        }
        values = torch.stack([v.float() for v in sums.values()]).tolist()
        return {"queries": float(scores.shape[0]), **dict(zip(sums, values, strict=True))}


def window_means(sums: Mapping[str, float]) -> dict[str, float | None]:
    """:func:`group_signals` sums over a window turned into the logged means."""
    queries = sums.get("queries", 0.0)
    if not queries:
        return {}

    def mean(total: str, count: str) -> float | None:
        return sums[total] / sums[count] if sums.get(count) else None

    return {
        "accuracy": sums["correct"] / queries,
        "positive_score": sums["positive_score"] / queries,
        "negative_score": mean("negative_score", "negatives"),
        "score_margin": mean("score_margin", "with_negatives"),
        "candidates_per_query": 1 + sums["negatives"] / queries,
    }


@dataclass
class ListwiseCrossEntropy:
    r"""FlagEmbedding's reranker loss: softmax cross-entropy over each query's group.

    .. math::

        \mathcal{L} = -\frac{1}{B} \sum_b \log
            \frac{\exp s_{b+}}{\sum_{j \in G_b} \exp s_{bj}}

    Inputs: ``pairs`` [P], one logit per (query, group passage) pair in the batch's passage
    order, and the layout. Chance level :math:`\ln |G_b|` (every pair scored alike). Use it
    for hard-negative groups with one positive each: it is what bge-rerankers are trained with.
    """

    name: str = "listwise"

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The listwise loss of this process's queries."""
        scores = candidate_scores(representations["pairs"], layout)
        loss = F.cross_entropy(scores, layout.positive_index)
        return ObjectiveOutput(
            loss=loss,
            terms={self.name: loss},
            signal_sums=lambda: group_signals(scores, layout.positive_index),
            details=scores,
        )

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """Chance level ln(group size), loss over chance, then :func:`window_means`."""
        means = window_means(sums)
        candidates = means.get("candidates_per_query") or 1.0
        return {
            "chance_loss": math.log(candidates),
            "loss_over_chance": loss / math.log(candidates) if candidates > 1 else None,
            **means,
        }


@dataclass
class PointwiseBCE:
    r"""Binary cross-entropy on every pair (sentence-transformers' BinaryCrossEntropyLoss).

    .. math::

        \mathcal{L} = -\frac{1}{|P|} \sum_{(b, j)} y_{bj} \log \sigma(s_{bj})
            + (1 - y_{bj}) \log (1 - \sigma(s_{bj}))

    with :math:`y = 1` for the query's positive (and a group passage that is one of its
    positives), 0 for its negatives. Chance level: the binary entropy of the positive share
    :math:`\pi = 1/|G|`, the loss of a model that predicts :math:`\pi` for every pair. Use it when
    the logits should read as calibrated relevance probabilities (a threshold, not only an
    order), or when groups hold several positives.
    """

    name: str = "pointwise"

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The mean binary cross-entropy of this process's pairs."""
        logits = representations["pairs"].float()
        # A cross-encoder's batch is never gathered across processes: owners are 0..B-1.
        pairs = torch.arange(len(logits), device=logits.device)
        duplicate = layout.false_negative_mask.to(logits.device)[layout.passage_owner, pairs]
        labels = duplicate.float()
        labels[layout.positive_index] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        scores = pair_score_matrix(logits, layout)

        def signal_sums() -> dict[str, float]:
            sums = group_signals(scores, layout.positive_index)
            return {**sums, "pairs": float(len(labels)), "positive_pairs": labels.sum().item()}

        return ObjectiveOutput(loss, {self.name: loss}, signal_sums, details=scores)

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """Chance level (binary entropy of the positive share), then :func:`window_means`."""
        share = sums.get("positive_pairs", 0.0) / sums["pairs"] if sums.get("pairs") else 0.0
        chance = (
            -(share * math.log(share) + (1 - share) * math.log(1 - share))
            if 0 < share < 1
            else None
        )
        return {
            "chance_loss": chance,
            "loss_over_chance": loss / chance if chance else None,
            **window_means(sums),
        }


RERANKER_LOSSES = {ListwiseCrossEntropy.name: ListwiseCrossEntropy, PointwiseBCE.name: PointwiseBCE}


def reranker_objective(config: TrainConfig) -> Objective:
    """``--reranker-loss``'s objective, or with ``--knowledge-distillation`` the
    ``--kd-loss-type`` objective on the pair logits (``kl_div`` joined with the hard one)."""
    hard = RERANKER_LOSSES[config.reranker_loss]()
    if not config.knowledge_distillation:
        return hard
    from embtune.objectives.distillation import distillation_objective

    return distillation_objective(config, hard=hard, scores=PairScores())
