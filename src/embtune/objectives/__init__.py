"""Objectives: a step's representations and batch layout -> loss, named terms, signals.

The interface is :class:`~embtune.objectives.base.Objective`. :class:`InfoNCE` is the contrastive
objective; :class:`KLDistillation`, :class:`M3Distillation` and :class:`MarginMSE` learn from
teacher scores (``--kd-loss-type``); :class:`ListwiseCrossEntropy` and :class:`PointwiseBCE` train
a cross-encoder's pair logits (``--reranker-loss``); :class:`WeightedSum` combines several;
:class:`Matryoshka` applies one at several embedding dimensions; :func:`objective_from_options`
builds the one `embtune train`'s options name. Adding one is one module plus, when the command
line should choose it, its line in :data:`OBJECTIVES` (docs/architecture.md, "Adding an
objective").
"""

from __future__ import annotations

from embtune.objectives.base import Objective, ObjectiveOutput, WeightedSum
from embtune.objectives.distillation import KLDistillation, M3Distillation, MarginMSE
from embtune.objectives.from_options import objective_from_options
from embtune.objectives.infonce import InfoNCE
from embtune.objectives.matryoshka import Matryoshka
from embtune.objectives.reranking import ListwiseCrossEntropy, PointwiseBCE

OBJECTIVES = {
    objective.name: objective
    for objective in (
        InfoNCE,
        KLDistillation,
        M3Distillation,
        MarginMSE,
        ListwiseCrossEntropy,
        PointwiseBCE,
    )
}

__all__ = [
    "OBJECTIVES",
    "InfoNCE",
    "KLDistillation",
    "ListwiseCrossEntropy",
    "M3Distillation",
    "MarginMSE",
    "Matryoshka",
    "Objective",
    "ObjectiveOutput",
    "PointwiseBCE",
    "WeightedSum",
    "objective_from_options",
]
