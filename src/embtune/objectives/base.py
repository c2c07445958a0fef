"""What an objective is: representations + batch layout -> loss, named terms, logged signals.

The training loop knows nothing about embeddings or scores: it back-propagates
:attr:`ObjectiveOutput.loss`, sums :meth:`ObjectiveOutput.signal_sums` over a logging window
(and over processes), and logs what :meth:`Objective.window_record` makes of those sums. An
objective never sees the model (as in sentence-transformers, the loss is computed from
representations), so the step strategies (plain, cached, cross-device) work for every one.

Objectives combine: :class:`WeightedSum` adds weighted objectives (distillation + InfoNCE), and
a wrapper such as Matryoshka is an objective that calls another on truncated representations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from embtune.data.batching import GroupLayout


@dataclass
class ObjectiveOutput:
    """One step's loss and what the log needs to explain it."""

    loss: torch.Tensor  # scalar, back-propagated
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts of the loss
    # Sums over the step's queries (plus "queries"), computed only for steps that are logged
    # (a skipped step's scores are not worth a device transfer). Sums add up exactly over a
    # window and over processes; window_record turns them into means.
    signal_sums: Callable[[], dict[str, float]] = dict
    details: Any = None  # the objective's own output (e.g. the score matrix), for tests


def term_values(output: ObjectiveOutput) -> dict[str, float]:
    """The terms of a trained step as floats for the log (one device transfer), or nothing
    when there is at most one term (it is the loss, logged already)."""
    if len(output.terms) < 2:
        return {}
    values = torch.stack([term.detach().float() for term in output.terms.values()]).tolist()
    return dict(zip(output.terms, values, strict=True))


class Objective(Protocol):
    """A training objective: see the module docstring and objectives/infonce.py."""

    name: str

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The loss of one step from the encoded parts (by part name) and the batch layout."""
        ...

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """Logged values of a window from its summed signals and its mean loss (chance level
        and loss over chance where they are defined; None values are left out of the log)."""
        ...


class WeightedSum:
    """``sum_i w_i * L_i`` over objectives; the first one's signals are logged as they are,
    the others' with their name as prefix, and every loss as a term ``<name>``.

    Example: ``WeightedSum([(1.0, InfoNCE(0.02)), (0.5, distillation)])``.
    """

    def __init__(self, parts: Sequence[tuple[float, Objective]]) -> None:
        if not parts:
            raise ValueError("WeightedSum needs at least one objective")
        self.parts = list(parts)
        self.name = "+".join(objective.name for _, objective in self.parts)

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """Every objective on the same representations; their weighted losses added."""
        outputs = [objective(representations, layout) for _, objective in self.parts]
        loss = sum(
            (weight * out.loss for (weight, _), out in zip(self.parts, outputs, strict=True)),
            torch.zeros((), device=outputs[0].loss.device),
        )
        terms = {obj.name: out.loss for (_, obj), out in zip(self.parts, outputs, strict=True)}

        def signal_sums() -> dict[str, float]:
            merged: dict[str, float] = {}
            for index, ((_, obj), out) in enumerate(zip(self.parts, outputs, strict=True)):
                prefix = "" if index == 0 else f"{obj.name}_"
                merged.update({prefix + k: v for k, v in out.signal_sums().items()})
            return merged

        return ObjectiveOutput(loss, terms, signal_sums, outputs)

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """The first objective's record, then the others' under their prefixes."""
        prefixes = [f"{obj.name}_" for _, obj in self.parts[1:]]
        first = {k: v for k, v in sums.items() if not k.startswith(tuple(prefixes))}
        record = dict(self.parts[0][1].window_record(first, loss))
        for prefix, (_, obj) in zip(prefixes, self.parts[1:], strict=True):
            own = {k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)}
            record.update({prefix + k: v for k, v in obj.window_record(own, loss).items()})
        return record
