"""The sizes a plan measures: batch sizes doubling at the run's group size, until the budget,
the wanted batch or the time limit is reached."""

from __future__ import annotations

from collections.abc import Callable

from embtune.hardware_plan.measure import Measurement, Point
from embtune.hardware_plan.memory_fit import fit_line

# Doubling from 1: each point costs about twice the last, so the whole grid costs about twice its
# largest point, and the line is fitted over a wide range of sizes.
FIRST_BATCH = 1


def measure_grid(
    run: Callable[[Point], Measurement],
    group_size: int,
    precision: str,
    budget: int,
    largest_batch: int,
    time_limit: float,
    on_point: Callable[[Measurement], None] = lambda m: None,
) -> list[Measurement]:
    """Measure batch sizes 1, 2, 4, ... (plain loss) and return every measurement in order.

    Stops after a point that does not fit ``budget`` or fails, when the next point is
    predicted (from the line through the points so far) not to fit, when the batch would
    pass ``largest_batch``, or when the next point, estimated at twice the last one's time,
    would take the points' time past ``time_limit`` seconds (two points are always measured).
    """
    measured: list[Measurement] = []
    batch = FIRST_BATCH
    while batch <= largest_batch:
        measurement = run(Point(batch, group_size, 0, precision))
        measured.append(measurement)
        on_point(measurement)
        if measurement.error or measurement.peak_bytes > budget:
            break
        batch *= 2
        good = [m for m in measured if not m.error]
        if len(good) >= 2:
            line = fit_line([m.point.texts for m in good], [m.peak_bytes for m in good])
            if line.predict(batch * (1 + group_size)) > budget:
                break
            spent = sum(m.seconds for m in measured)
            if spent + 2 * measurement.seconds > time_limit:
                break
    return measured
