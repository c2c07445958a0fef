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

RULE = (
    "keep the trials whose final dev nDCG@10 is within --auto-tolerance of the best trial's; "
    "of those take the best mean reference nDCG@10 (with --reference-data), else the smallest "
    "learning rate"
)

# Slack for the comparison with the tolerance: 0.505 - 0.005 is 0.49999999999999994.
_EPSILON = 1e-12


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
    """Apply :data:`RULE` to ``trials``; TrainingStopped when none is usable."""
    usable = [t for t in trials if t.usable]
    if not usable:
        failed = next((t for t in trials if t.error), None)
        first = f" ({failed.learning_rate!r}: {failed.error})" if failed else ""
        raise TrainingStopped(
            f"--learning-rate auto: no trial finished with a dev nDCG@10{first}; nothing to "
            "choose from (pass a number, or fix the trials' problem and --resume)"
        )
    best = max(t.dev_ndcg10 for t in usable)  # type: ignore[type-var]
    kept = sorted(
        (t for t in usable if t.dev_ndcg10 >= best - tolerance - _EPSILON),  # type: ignore[operator]
        key=lambda t: t.learning_rate,
    )
    within = (
        f"{len(kept)} of {len(usable)} trials within {tolerance:g} of the best dev nDCG@10 "
        f"({best:.4f})"
    )
    with_reference = any(t.reference_ndcg10 for t in kept)
    if with_reference and all(t.reference_mean is not None for t in kept):
        # Ties go to the smaller rate, the conservative one.
        chosen = max(kept, key=lambda t: (t.reference_mean, -t.learning_rate))
        reason = f"the best mean reference nDCG@10 ({chosen.reference_mean:.4f}) of the {within}"
    else:
        chosen = kept[0]
        reason = f"the smallest learning rate of the {within}"
        if with_reference:
            reason += " (a trial logged no reference nDCG@10, so the reference sets did not decide)"
    skipped = len(trials) - len(usable)
    if skipped:
        reason += f"; {skipped} failed trial{'s' if skipped > 1 else ''} skipped"
    return Choice(chosen.learning_rate, reason, [t.learning_rate for t in kept], best)
