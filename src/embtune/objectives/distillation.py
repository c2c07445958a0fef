r"""Distillation from teacher scores: the student learns the teacher's view of each group.

Rows carry a teacher's scores of their passages (``pos_scores`` / ``neg_scores``, written by
``embtune score``, FlagEmbedding's ``add_reranker_score`` or ``embtune mine``). The batch layout
brings each group passage's score (``GroupLayout.teacher_scores``, NaN where there is none: a
slot filled from the corpus, a row without scores). Three losses, chosen by ``--kd-loss-type``:

* ``kl_div`` (:class:`KLDistillation`, joined with InfoNCE by :func:`distillation_objective`):
  FlagEmbedding's default. Soft cross-entropy toward the teacher's distribution over the
  query's own group, plus the usual hard InfoNCE term.
* ``m3_kd_loss`` (:class:`M3Distillation`): FlagEmbedding's bge-m3 loss. Every passage of the
  group is a target, weighted by the teacher, against all in-batch candidates.
* ``margin_mse`` (:class:`MarginMSE`): sentence-transformers' MarginMSELoss. The student's
  positive-negative score margins regress onto the teacher's.

Common notation, for query :math:`b` with own group :math:`G_b` (its positive first, then its
negatives) and the subset :math:`K_b \subseteq G_b` of passages with a teacher score
:math:`t_{bj}`:

.. math::

    s_{bj} = \frac{q_b \cdot p_j}{\tau}, \qquad
    w_{bj} = \operatorname{softmax}_{j \in K_b}\Big(\frac{t_{bj}}{\tau_t}\Big)

:math:`\tau` is ``--temperature`` (the student's, as in InfoNCE) and :math:`\tau_t` is
``--teacher-temperature`` (1.0, as FlagEmbedding, which has none). A passage without a teacher
score is never given one: it is left out of :math:`K_b` (and counted in the log as
``unscored_group_slots``); a query with fewer than two scored passages has no distribution to
learn and is left out of the soft term (``kd_queries`` counts those that remain).

Logged beside the loss (prefix ``<name>_``): the teacher's entropy over :math:`K_b`, the share of
queries whose top passage is the same for teacher and student (``top1_agreement``), and the mean
Spearman rank correlation of their scores over :math:`K_b`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embtune.config import TrainConfig
from embtune.data.batching import GroupLayout, own_group_mask
from embtune.objectives.base import Objective, ObjectiveOutput, WeightedSum
from embtune.objectives.infonce import InfoNCE
from embtune.objectives.scores import Scores, SimilarityScores


@dataclass
class TeacherView:
    """The step's scores seen group by group: [B, G] matrices over each query's own group."""

    columns: torch.Tensor  # [B, G] passage column of the query's j-th group slot (0 = padding)
    in_group: torch.Tensor  # [B, G] True where slot j exists (groups may differ in size)
    scored: torch.Tensor  # [B, G] True where the slot exists and has a teacher score
    teacher: torch.Tensor  # [B, G] t / teacher_temperature, -inf where not scored
    student: torch.Tensor  # [B, P] q.p / temperature against every passage
    own: torch.Tensor  # [B, P] True where the passage is in the query's own group

    @property
    def distilled(self) -> torch.Tensor:
        """[B] True for queries with at least two scored passages (a distribution to learn)."""
        return self.scored.sum(1) >= 2

    def targets(self) -> torch.Tensor:
        """[B, G] the teacher's softmax over each query's scored passages (0 elsewhere; a row
        with no scored passage is all 0)."""
        safe = self.teacher.masked_fill(~self.scored.any(1, keepdim=True), 0.0)
        return torch.softmax(safe, dim=1).masked_fill(~self.scored, 0.0)

    def student_in_group(self) -> torch.Tensor:
        """[B, G] the student's scores of each group slot."""
        return self.student.gather(1, self.columns)


def teacher_view(
    representations: Mapping[str, torch.Tensor],
    layout: GroupLayout,
    temperature: float,
    teacher_temperature: float,
) -> TeacherView:
    """A bi-encoder's view: student scores q.p / temperature against every passage."""
    student = SimilarityScores(temperature)(representations, layout)
    return group_view(student, layout, teacher_temperature)


def group_view(
    student: torch.Tensor, layout: GroupLayout, teacher_temperature: float
) -> TeacherView:
    """Both sides' scores slot by slot per group, from the student's [B, P] scores (any
    model kind's: :mod:`embtune.objectives.scores`)."""
    own = own_group_mask(layout.passage_owner, layout.query_index, layout.queries)
    sizes = own.sum(1)
    width = max(int(sizes.max().item()), 1) if own.numel() else 1
    # Group passages are contiguous and in order, so a stable sort of ~own lists each query's
    # columns first, positive first.
    order = torch.sort((~own).to(torch.int8), dim=1, stable=True).indices[:, :width]
    in_group = torch.arange(width, device=student.device).unsqueeze(0) < sizes.unsqueeze(1)
    columns = order.masked_fill(~in_group, 0)
    if layout.teacher_scores is None:
        raw = torch.full(columns.shape, math.nan, device=student.device)
    else:
        raw = layout.teacher_scores.to(student.device).float()[columns]
    scored = in_group & torch.isfinite(raw)
    teacher = (raw / teacher_temperature).masked_fill(~scored, float("-inf"))
    return TeacherView(columns, in_group, scored, teacher, student, own)


def agreement_sums(view: TeacherView) -> dict[str, float]:
    """Sums over distilled queries: teacher entropy, top-1 agreement, Spearman correlation;
    plus the group slots without a teacher score."""
    with torch.no_grad():
        chosen = view.distilled
        targets = view.targets()[chosen]
        scored = view.scored[chosen]
        teacher = view.teacher[chosen]
        student = view.student_in_group().detach()[chosen].masked_fill(~scored, float("-inf"))
        logs = torch.where(targets > 0, targets.clamp_min(1e-30).log(), torch.zeros_like(targets))
        sums = {
            "kd_queries": chosen.sum(),
            "teacher_entropy": -(targets * logs).sum(),
            "top1_agreement": (teacher.argmax(1) == student.argmax(1)).sum(),
            "rank_correlation": _spearman(teacher, student, scored).sum(),
            "unscored_group_slots": (view.in_group & ~view.scored).sum(),
            "group_slots": view.in_group.sum(),
        }
        # One transfer for all of them, as InfoNCE's signals (a GPU waits once).
        values = torch.stack([v.double() for v in sums.values()]).tolist()
        return dict(zip(sums, values, strict=True))


def _ranks(scores: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[B, G] each scored slot's rank among its row's scored slots (ties by position)."""
    below = scores.unsqueeze(1) < scores.unsqueeze(2)  # [b, i, j]: slot j below slot i
    tied_before = (scores.unsqueeze(1) == scores.unsqueeze(2)) & torch.ones_like(below).tril(-1)
    counted = (below | tied_before) & scored.unsqueeze(1) & scored.unsqueeze(2)
    return counted.sum(2).double()


def _spearman(a: torch.Tensor, b: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[B] Spearman's rank correlation of two score rows over their scored slots (0 when a side
    is constant)."""
    mask = scored.double()
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    ranks = [_ranks(x, scored) for x in (a, b)]
    centred = [(r - (r * mask).sum(1, keepdim=True) / count) * mask for r in ranks]
    covariance = (centred[0] * centred[1]).sum(1)
    scale = centred[0].norm(dim=1) * centred[1].norm(dim=1)
    return torch.where(scale > 0, covariance / scale.clamp_min(1e-300), torch.zeros_like(scale))


class _TeacherObjective:
    """What the three distillation losses share: the view, the logged agreement signals.

    ``scores`` makes the student's [B, P] scores from the representations: by default a
    bi-encoder's q.p / temperature; a cross-encoder's pair logits with
    :class:`~embtune.objectives.scores.PairScores` (``temperature`` is then unused).
    """

    name = "kd"

    def __init__(
        self, temperature: float, teacher_temperature: float = 1.0, scores: Scores | None = None
    ) -> None:
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.scores = scores or SimilarityScores(temperature)

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The loss of :meth:`loss` with the agreement signals of :func:`agreement_sums`."""
        student = self.scores(representations, layout)
        view = group_view(student, layout, self.teacher_temperature)
        loss = self.loss(view, layout)
        return ObjectiveOutput(
            loss=loss,
            terms={self.name: loss},
            signal_sums=lambda: agreement_sums(view),
            details=view,
        )

    def loss(self, view: TeacherView, layout: GroupLayout) -> torch.Tensor:
        """The objective's loss from the step's view (each subclass's formula)."""
        raise NotImplementedError

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """Means over the window's distilled queries, and the unscored slots it met."""
        queries = sums.get("kd_queries", 0.0)

        def mean(key: str) -> float | None:
            return sums[key] / queries if queries else None

        return {
            "teacher_entropy": mean("teacher_entropy"),
            "top1_agreement": mean("top1_agreement"),
            "rank_correlation": mean("rank_correlation"),
            "kd_queries": queries,
            "unscored_group_slots": sums.get("unscored_group_slots", 0.0),
        }


class KLDistillation(_TeacherObjective):
    r"""FlagEmbedding's ``kl_div`` soft term (its hard InfoNCE term is added by
    :func:`distillation_objective`).

    .. math::

        \mathcal{L}_{kd} = -\frac{1}{|D|} \sum_{b \in D} \sum_{j \in K_b}
            w_{bj} \log \operatorname{softmax}_{k \in K_b}(s_{bk})_j

    over the distilled queries :math:`D` (two or more scored passages). With every passage
    scored it is FlagEmbedding's ``distill_loss('kl_div', softmax(t), local_scores)`` (a cross
    entropy; it differs from the KL divergence by the teacher's entropy, a constant). Use it to
    pull the student toward a stronger teacher's ranking of hard negatives while InfoNCE keeps
    the positives first.
    """

    name = "kl_div"

    def loss(self, view: TeacherView, layout: GroupLayout) -> torch.Tensor:
        """The soft cross entropy over each query's scored group passages."""
        student = view.student_in_group().masked_fill(~view.scored, float("-inf"))
        chosen = view.distilled
        if not chosen.any():
            return student.sum() * 0.0  # keeps the graph: every process joins the backward
        log_p = torch.log_softmax(student[chosen], dim=1)
        targets = view.targets()[chosen]
        per_query = -(targets * log_p.masked_fill(targets == 0, 0.0)).sum(1)
        return per_query.mean()


class M3Distillation(_TeacherObjective):
    r"""FlagEmbedding's ``m3_kd_loss`` (bge-m3): each group passage in turn is the target of a
    softmax over all candidates, weighted by the teacher, with the group's earlier passages
    taken out of the softmax.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_b \sum_{j} \tilde w_{bj}\,
            \Big(-\log \frac{\exp s_{b g_j}}
            {\sum_{p \in C_b \setminus \{g_1..g_{j-1}\}} \exp s_{bp}}\Big)

    :math:`g_j` is the query's j-th group passage, :math:`C_b` its InfoNCE candidates (the whole
    batch, or its own group with ``--no-in-batch-negatives``; false negatives removed as
    InfoNCE removes them) and :math:`\tilde w_{bj}` the teacher's softmax over the scored
    passages. A query without scored passages (only with --allow-unscored-rows) gets all its
    weight on its positive: its InfoNCE term. With every passage scored it equals
    FlagEmbedding's ``distill_loss('m3_kd_loss', ...)``. Use it when the teacher's scores are
    graded relevance (several passages may be relevant), so no single positive is forced first.
    """

    name = "m3_kd_loss"

    def __init__(
        self,
        temperature: float,
        teacher_temperature: float = 1.0,
        in_batch_negatives: bool = True,
        scores: Scores | None = None,
    ) -> None:
        super().__init__(temperature, teacher_temperature, scores)
        self.in_batch_negatives = in_batch_negatives

    def loss(self, view: TeacherView, layout: GroupLayout) -> torch.Tensor:
        """Sum over group slots of teacher-weighted cross entropies, earlier slots masked."""
        weights = view.targets()
        unscored = ~view.scored.any(1)
        weights[unscored, 0] = 1.0  # the positive: plain InfoNCE for a row without scores
        candidate = self._candidates(view, layout)
        rows = torch.arange(view.columns.shape[0], device=view.student.device)
        # From the group's scores, which are finite for every model kind (a cross-encoder's
        # [B, P] scores are -inf outside the own group: their sum times 0 would be NaN).
        loss = view.student_in_group().sum() * 0.0
        for j in range(view.columns.shape[1]):
            target = view.columns[:, j]
            allowed = candidate.clone()
            allowed[rows, target] = True
            logits = view.student.masked_fill(~allowed, float("-inf"))
            slot = F.cross_entropy(logits, target, reduction="none")
            weight = weights[:, j]
            loss = loss + (weight * slot.masked_fill(weight == 0, 0.0)).mean()
            earlier = view.scored[:, j] | (unscored & (j == 0))
            candidate[rows[earlier], target[earlier]] = False
        return loss

    def _candidates(self, view: TeacherView, layout: GroupLayout) -> torch.Tensor:
        """[B, P] InfoNCE's candidates: every passage (or the own group), no false negative."""
        own = view.own
        candidate = torch.ones_like(own) if self.in_batch_negatives else own
        return candidate & ~layout.false_negative_mask.to(own.device)


class MarginMSE(_TeacherObjective):
    r"""sentence-transformers' MarginMSELoss over each query's group.

    .. math::

        \mathcal{L} = \frac{1}{|M|} \sum_{(b, n) \in M}
            \Big((s_{b+} - s_{bn}) - \frac{t_{b+} - t_{bn}}{\tau_t}\Big)^2

    over the pairs :math:`M` of a query's positive and one of its negatives, both scored by the
    teacher. With ``--temperature 1 --teacher-temperature 1`` the student's margins are raw
    dot products, as in sentence-transformers; for normalized embeddings (margins of cosines,
    at most 2) keep ``--temperature`` low so the student's margins can reach a cross-encoder's.
    No hard term is added (rows without teacher scores contribute nothing). Use it with a
    cross-encoder teacher whose score differences, not only its ranking, mean something.
    """

    name = "margin_mse"

    def loss(self, view: TeacherView, layout: GroupLayout) -> torch.Tensor:
        """Mean squared error of margins over the scored (positive, negative) pairs."""
        student = view.student_in_group()
        pairs = view.scored[:, 1:] & view.scored[:, :1]
        if not pairs.any():
            return student.sum() * 0.0
        student_margin = student[:, :1] - student[:, 1:]
        teacher = view.teacher.masked_fill(~view.scored, 0.0)
        teacher_margin = teacher[:, :1] - teacher[:, 1:]
        return F.mse_loss(student_margin[pairs], teacher_margin[pairs])


def distillation_objective(
    config: TrainConfig, hard: Objective | None = None, scores: Scores | None = None
) -> Objective:
    """``--kd-loss-type``'s objective: ``kl_div`` joined with the hard objective (FlagEmbedding
    adds it, for embedders and rerankers alike), the others alone.

    ``hard`` defaults to InfoNCE and ``scores`` to the bi-encoder's similarities; a
    cross-encoder passes its listwise objective and :class:`~embtune.objectives.scores.
    PairScores`.
    """
    temperature, teacher_temperature = config.temperature, config.teacher_temperature
    if config.kd_loss_type == "kl_div":
        hard = hard or InfoNCE(temperature, config.in_batch_negatives)
        soft = KLDistillation(temperature, teacher_temperature, scores)
        return WeightedSum([(1.0, hard), (1.0, soft)])
    if config.kd_loss_type == "m3_kd_loss":
        return M3Distillation(temperature, teacher_temperature, config.in_batch_negatives, scores)
    return MarginMSE(temperature, teacher_temperature, scores)
