"""The rule ``--learning-rate auto`` chooses by: a pure function of the trials' numbers.

Keep the trials whose final dev nDCG@10 is within ``--auto-tolerance`` of the best trial's; of
those take the one with the best mean reference nDCG@10 when reference sets are given, else the
smallest learning rate. Within the tolerance the dev set is taken not to tell the rates apart,
so the tiebreak is what it does not measure: what fine-tuning costs outside the domain, as the
reference sets show, or without them the rate that moves the model least from its base (the
most conservative). Failed trials are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from embtune.errors import TrainingStopped
from embtune.selection import RULE, Candidate, choose

__all__ = ["RULE", "Choice", "Trial", "choose_learning_rate"]


@dataclass
class Trial:
    """One learning rate's short training, as the rule sees it; None: not reported."""

    learning_rate: float
    dev_ndcg10: float | None = None
    # Reference set name -> its nDCG@10 at the trial's last evaluation (None: not logged).
    reference_ndcg10: dict[str, float | None] = field(default_factory=dict)
    status: str = "not run"  # done | reused | failed
    seconds: float | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        """True when the trial finished with a dev nDCG@10."""
        return self.status in ("done", "reused") and self.dev_ndcg10 is not None

    @property
    def reference_mean(self) -> float | None:
        """Mean nDCG@10 over the reference sets; None without them or when one is missing."""
        values = list(self.reference_ndcg10.values())
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]


@dataclass
class Choice:
    """The learning rate the rule chose, why, and the trials it chose among."""

    learning_rate: float
    reason: str
    kept: list[float]  # the learning rates within the tolerance, smallest first
    best_dev_ndcg10: float


def choose_learning_rate(trials: Sequence[Trial], tolerance: float) -> Choice:
    """Apply :data:`RULE` (embtune.selection's, as ``--interpolate-base auto`` does) to
    ``trials``; TrainingStopped when none is usable."""
    usable = [t for t in trials if t.usable]
    if not usable:
        failed = next((t for t in trials if t.error), None)
        first = f" ({failed.learning_rate!r}: {failed.error})" if failed else ""
        raise TrainingStopped(
            f"--learning-rate auto: no trial finished with a dev nDCG@10{first}; nothing to "
            "choose from (pass a number, or fix the trials' problem and --resume)"
        )
    candidates = [Candidate(t.learning_rate, t.dev_ndcg10, t.reference_mean) for t in usable]
    picked = choose(candidates, tolerance, "learning rate")
    reason = picked.reason
    skipped = len(trials) - len(usable)
    if skipped:
        reason += f"; {skipped} failed trial{'s' if skipped > 1 else ''} skipped"
    return Choice(picked.chosen.value, reason, picked.kept, picked.best_dev)
