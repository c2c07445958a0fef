"""Objectives: a step's representations and batch layout -> loss, named terms, signals.

The interface is :class:`~embtune.objectives.base.Objective`; :class:`InfoNCE` is the first one,
:class:`WeightedSum` combines several. Adding one is one module plus, when the command line
should choose it, its line in :data:`OBJECTIVES` (docs/architecture.md, "Adding an
objective").
"""

from __future__ import annotations

from embtune.objectives.base import Objective, ObjectiveOutput, WeightedSum
from embtune.objectives.infonce import InfoNCE

OBJECTIVES = {InfoNCE.name: InfoNCE}

__all__ = ["OBJECTIVES", "InfoNCE", "Objective", "ObjectiveOutput", "WeightedSum"]
