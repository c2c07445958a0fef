"""Objectives: a step's representations and batch layout -> loss, named terms, signals.

The interface is :class:`~embtune.objectives.base.Objective`; :class:`InfoNCE` is the first one,
:class:`WeightedSum` combines several, :class:`Matryoshka` applies one at several embedding
dimensions. Adding one is one module plus, when the command line
should choose it, its line in :data:`OBJECTIVES` (docs/architecture.md, "Adding an
objective").
"""

from __future__ import annotations

from embtune.objectives.base import Objective, ObjectiveOutput, WeightedSum
from embtune.objectives.infonce import InfoNCE
from embtune.objectives.matryoshka import Matryoshka

OBJECTIVES = {InfoNCE.name: InfoNCE}

__all__ = ["OBJECTIVES", "InfoNCE", "Matryoshka", "Objective", "ObjectiveOutput", "WeightedSum"]
