"""Student scores as an objective reads them: one [B, P] matrix of query-by-passage scores.

A bi-encoder scores every query against every passage of the batch (:class:`SimilarityScores`);
a cross-encoder scores only the pairs it was given, each query with its own group's passages
(:class:`PairScores`: -inf elsewhere, so a softmax over a row is a softmax over the group).
Objectives that only need scores (distillation, listwise ranking) take either, so each is
written once for every model kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from embtune.data.batching import GroupLayout, own_group_mask


class Scores(Protocol):
    """Representations + layout -> [B, P] student scores (-inf where a pair is not scored)."""

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> torch.Tensor:
        """The [B, P] score matrix of one step."""
        ...


@dataclass
class SimilarityScores:
    """A bi-encoder's scores: ``q . p / temperature`` of ``queries`` [B, H] and ``passages``
    [P, H], in float32."""

    temperature: float

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> torch.Tensor:
        """Every query against every passage."""
        queries, passages = representations["queries"], representations["passages"]
        return queries.float() @ passages.float().T / self.temperature


@dataclass
class PairScores:
    """A cross-encoder's scores: the logit of each (query, own-group passage) pair, from
    ``pairs`` [P] (laid out as the batch's passages), -inf for passages of other groups."""

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> torch.Tensor:
        """[B, P] with each row's own group filled in."""
        return pair_score_matrix(representations["pairs"], layout)


def pair_score_matrix(pair_scores: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """[B, P] float32: pair ``p``'s score in its query's row, -inf in every other row."""
    own = own_group_mask(layout.passage_owner, layout.query_index, layout.queries)
    scores = pair_scores.float().view(1, -1).expand(own.shape[0], -1)
    return scores.masked_fill(~own, float("-inf"))
