"""The rule of embtune's automatic choices (``--interpolate-base auto``, ``--learning-rate
auto``): good enough on dev, then what keeps the most of the base model.

Dev scores of candidates a few thousandths apart are within the noise of a dev set of a few
hundred queries, so the best dev score alone would pick by chance among them. The rule keeps
every candidate within ``--auto-tolerance`` of the best dev nDCG@10 and, of those, takes the
one with the best mean nDCG@10 over the reference sets (``--reference-data``: what the model
still knows outside the domain); without reference sets, the one closest to the base model
(the smallest interpolation factor or learning rate), which forgets least by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RULE = (
    "keep the candidates whose dev nDCG@10 is within --auto-tolerance of the best; of those "
    "take the best mean reference nDCG@10, or without reference sets the one closest to the "
    "base model"
)


@dataclass(frozen=True)
class Candidate:
    """One option of an automatic choice and its scores."""

    value: float  # the interpolation factor or learning rate
    dev: float | None  # dev nDCG@10 (None: not measured, e.g. a failed trial)
    reference: float | None = None  # mean reference nDCG@10 (None without reference sets)


# Slack for the comparison with the tolerance: 0.505 - 0.005 is 0.49999999999999994.
_EPSILON = 1e-12


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, why in words, the values kept by the tolerance (smallest first)
    and the best dev nDCG@10."""

    chosen: Candidate
    reason: str
    kept: list[float]
    best_dev: float


def choose(candidates: Sequence[Candidate], tolerance: float, what: str = "value") -> Choice:
    """Apply the rule (module docstring); ``what`` names the value in the reason ("factor").

    Candidates without a dev score are skipped; a value closer to the base model is a smaller
    one. Raises ValueError when no candidate has a dev score.
    """
    scored = [c for c in candidates if c.dev is not None]
    if not scored:
        raise ValueError("no candidate has a dev score")
    best = max(c.dev for c in scored)  # type: ignore[type-var]
    kept = sorted(
        (c for c in scored if c.dev >= best - tolerance - _EPSILON),  # type: ignore[operator]
        key=lambda c: c.value,
    )
    values = ", ".join(f"{c.value:g}" for c in kept)
    within = (
        f"{len(kept)} of {len(scored)} within {tolerance:g} of the best dev nDCG@10 "
        f"({best:.4f}): {what} {values}"
    )
    with_reference = any(c.reference is not None for c in kept)
    if with_reference and all(c.reference is not None for c in kept):
        # max() keeps the first of equal scores: the smallest value, the closer to the base.
        chosen = max(kept, key=lambda c: c.reference)  # type: ignore[arg-type, return-value]
        reason = f"the best mean reference nDCG@10 ({chosen.reference:.4f}) of the {within}"
    else:
        chosen = kept[0]
        reason = f"the closest to the base model (the smallest {what}) of the {within}"
        if with_reference:
            reason += " (one has no reference nDCG@10, so the reference sets did not decide)"
    return Choice(chosen, reason, [c.value for c in kept], best)  # type: ignore[arg-type]
