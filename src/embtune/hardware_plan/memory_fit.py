"""Peak memory as a straight line in texts per step, fitted to measured steps.

A training step's memory is the weights, gradients and optimizer state (fixed) plus the
activations kept for backward, which grow in proportion to the texts encoded with a graph. The
fit says how well a line explains the measurements, so a recommendation beyond the largest
measured point is known to be an extrapolation of a good or a poor fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearFit:
    """memory = fixed + per_text x texts (bytes), fitted by least squares."""

    fixed: float
    per_text: float
    r_squared: float  # 1.0: the line explains every measurement
    worst_error: float  # largest |measured - fitted| / measured over the points

    def predict(self, texts: int) -> float:
        """Predicted peak bytes of a step that encodes ``texts`` texts with a graph."""
        return self.fixed + self.per_text * texts

    def largest_within(self, budget: float) -> int:
        """The most texts per step whose predicted peak stays within ``budget`` bytes (0: none)."""
        if self.per_text <= 0:
            return 0 if self.fixed > budget else 10**9
        return max(0, math.floor((budget - self.fixed) / self.per_text))

    def is_linear(self, tolerance: float = 0.05) -> bool:
        """True when every measurement is within ``tolerance`` (relative) of the line."""
        return self.worst_error <= tolerance


def fit_line(texts: Sequence[float], peak_bytes: Sequence[float]) -> LinearFit:
    """Least-squares line through (texts per step, peak bytes); needs two distinct sizes."""
    x = np.asarray(texts, dtype=float)
    y = np.asarray(peak_bytes, dtype=float)
    if len(x) != len(y) or len(set(x.tolist())) < 2:
        raise ValueError("a line needs measurements at two or more distinct sizes")
    per_text, fixed = np.polyfit(x, y, 1)
    fitted = fixed + per_text * x
    spread = float(((y - y.mean()) ** 2).sum())
    r_squared = 1.0 - float(((y - fitted) ** 2).sum()) / spread if spread > 0 else 1.0
    worst = float((np.abs(y - fitted) / np.maximum(y, 1.0)).max())
    return LinearFit(float(fixed), float(per_text), r_squared, worst)
