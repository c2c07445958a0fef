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


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and why, in words."""

    chosen: Candidate
    reason: str


def choose(candidates: Sequence[Candidate], tolerance: float, what: str = "value") -> Choice:
    """Apply the rule (module docstring); ``what`` names the value in the reason ("factor").

    Candidates without a dev score are skipped; a value closer to the base model is a smaller
    one. Raises ValueError when no candidate has a dev score.
    """
    scored = [c for c in candidates if c.dev is not None]
    if not scored:
        raise ValueError("no candidate has a dev score")
    best = max(c.dev for c in scored)  # type: ignore[type-var]
    kept = sorted((c for c in scored if c.dev >= best - tolerance), key=lambda c: c.value)  # type: ignore[operator]
    values = ", ".join(f"{c.value:g}" for c in kept)
    within = f"dev nDCG@10 within {tolerance:g} of the best ({best:.4f}): {what} {values}"
    if all(c.reference is not None for c in kept):
        # max() keeps the first of equal scores: the smallest value, the closer to the base.
        chosen = max(kept, key=lambda c: c.reference)  # type: ignore[arg-type, return-value]
        return Choice(
            chosen, f"{within}; best mean reference nDCG@10 ({chosen.reference:.4f}) at "
            f"{what} {chosen.value:g}",
        )  # fmt: skip
    chosen = kept[0]
    return Choice(chosen, f"{within}; the closest to the base model is {what} {chosen.value:g}")
