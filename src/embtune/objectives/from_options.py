"""The objective that ``embtune train``'s options name.

``--temperature`` / ``--in-batch-negatives`` give InfoNCE; ``--knowledge-distillation`` with
``--kd-loss-type`` replaces or joins it with a distillation term (objectives/distillation.py);
``--matryoshka-dims`` wraps whatever results so it is applied at every dimension
(objectives/matryoshka.py). Each piece is its own objective; this function only composes them.
"""

from __future__ import annotations

from embtune.config import TrainConfig
from embtune.objectives.base import Objective
from embtune.objectives.infonce import InfoNCE


def objective_from_options(config: TrainConfig) -> Objective:
    """InfoNCE, distillation or both, optionally at several Matryoshka dimensions."""
    objective: Objective = InfoNCE(config.temperature, config.in_batch_negatives)
    if config.knowledge_distillation:
        from embtune.objectives.distillation import distillation_objective

        objective = distillation_objective(config)
    if config.matryoshka_dims:
        from embtune.objectives.matryoshka import Matryoshka

        weights = config.matryoshka_weights or [1.0] * len(config.matryoshka_dims)
        objective = Matryoshka(objective, config.matryoshka_dims, weights, config.normalize)
    return objective
