"""From measurements to a recommendation: batch x group, the cached loss's chunk, and why.

The rule, in order: the budget is what the device has free minus the headroom (or what the user
gives); a plain step fits when the fitted line predicts its peak within the budget; the batch is
the wanted one (``--batch-size``) or the largest up to ``max_batch`` that fits; a wanted batch
that does not fit plain keeps its size and switches on ``--cache-chunk-size`` with the largest
chunk that fits (GradCache's memory is one chunk's activations, whatever the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from embtune.errors import UsageError
from embtune.hardware_plan.measure import Measurement, Point
from embtune.hardware_plan.memory_fit import LinearFit

GIB = 2**30
# Beyond the largest measured step the line is trusted only with this margin: on
# all-MiniLM-L6-v2 (CPU) a line through 5-40 texts predicted 3.7% too little at 80 texts and
# 7.4% too much at 160 (docs/plan.md): the allocator does not grow exactly linearly.
EXTRAPOLATION_MARGIN = 0.10


@dataclass
class Recommendation:
    """The settings to train with, what they are predicted (and measured) to take, and why."""

    point: Point
    predicted_peak: float  # bytes, from the fitted line
    budget: int  # bytes
    extrapolated: bool  # beyond the largest measured size
    measured: Measurement | None = None  # the recommendation run for real, when it was
    reasons: list[str] = field(default_factory=list)


def texts_within(fit: LinearFit, budget: float, measured_texts: int) -> int:
    """The most texts per step that fit: by the line up to the largest measured step, beyond
    it with EXTRAPOLATION_MARGIN kept free."""
    texts = fit.largest_within(budget)
    if texts <= measured_texts:
        return texts
    return max(measured_texts, fit.largest_within(budget / (1 + EXTRAPOLATION_MARGIN)))


def chunk_within(fit: LinearFit, budget: float, group_size: int, measured_texts: int) -> int:
    """The largest cache chunk (texts) whose activations fit: passages, the longer texts, fill
    a chunk, so the per-text cost of mixed steps is scaled up by (1 + G) / G."""
    texts = texts_within(fit, budget, measured_texts)
    chunk = texts * group_size // (1 + group_size)
    return chunk // 8 * 8 if chunk >= 16 else chunk  # multiples of 8 suit the matrix kernels


def choose_point(
    fit: LinearFit,
    budget: float,
    group_size: int,
    precision: str,
    wanted_batch: int | None,
    max_batch: int,
    measured_texts: int,
) -> Point:
    """The recommended point under ``budget`` (bytes); UsageError when nothing fits.

    ``measured_texts``: the largest step measured (the line is extrapolated beyond it)."""
    chunk = chunk_within(fit, budget, group_size, measured_texts)
    if fit.predict(1 + group_size) > budget and chunk < 1:
        raise UsageError(
            f"the memory budget {budget / GIB:.2f} GiB is below what the model needs before any "
            f"activation ({fit.fixed / GIB:.2f} GiB predicted): raise --memory-budget, or use "
            "a smaller model"
        )
    plain_batch = texts_within(fit, budget, measured_texts) // (1 + group_size)
    batch = wanted_batch or max(1, min(plain_batch, max_batch))
    if batch <= plain_batch:
        return Point(batch, group_size, 0, precision)
    return Point(batch, group_size, max(1, chunk), precision)


def fit_reasons(fit: LinearFit, measured: Sequence[Measurement], point: Point) -> list[str]:
    """What the fit says and whether the recommendation is inside the measured range."""
    largest = max(m.point.texts for m in measured)
    lines = [
        f"memory = {fit.fixed / GIB:.2f} GiB + {fit.per_text / 2**20:.1f} MiB per text "
        f"(least squares over {len(measured)} sizes, R^2 {fit.r_squared:.4f}, worst point "
        f"{fit.worst_error:.1%} off the line)"
    ]
    if point.graph_texts > largest:
        quality = "a close" if fit.is_linear() else "a POOR"
        lines.append(
            f"{point.graph_texts} texts with a graph is beyond the largest measured step "
            f"({largest}): an extrapolation of {quality} linear fit"
        )
    return lines


def format_table(measured: Sequence[Measurement], budget: int) -> str:
    """The measured grid as a markdown table."""
    rows = [
        "| batch x group | texts/step | cache chunk | precision | peak memory | texts/s | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        p = m.point
        if m.error:
            rows.append(
                f"| {p.batch_size} x {p.group_size} | {p.texts} | {p.cache_chunk_size or '-'} | "
                f"{p.precision} | failed: {m.error} | | no |"
            )
            continue
        rows.append(
            f"| {p.batch_size} x {p.group_size} | {p.texts} | {p.cache_chunk_size or '-'} | "
            f"{p.precision} | {m.peak_bytes / GIB:.2f} GiB | {m.texts_per_second:.1f} | "
            f"{'yes' if m.peak_bytes <= budget else 'no'} |"
        )
    return "\n".join(rows)


def recommended_options(point: Point) -> dict[str, object]:
    """The recommendation as `embtune train` options (TrainConfig field names)."""
    options: dict[str, object] = {
        "batch_size": point.batch_size,
        "train_group_size": point.group_size,
    }
    if point.cache_chunk_size:
        options["cache_chunk_size"] = point.cache_chunk_size
    if point.precision == "bf16":
        options["bf16"] = True
    return options
