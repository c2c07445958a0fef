"""The epoch plan: the one definition of batch order and steps per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from embtune.config import TrainConfig
from embtune.data.epoch_plan import EpochPlan, epochs_of_run, steps_per_epoch, total_steps
from embtune.data.groups import GroupSampler, TrainRow
from embtune.data.pipeline import run_epochs

ROWS = [TrainRow(query=i, pos=np.array([i]), neg=np.array([100 + i, 200 + i])) for i in range(23)]


def plan(global_batch: int, world: int = 1, length_key=None) -> EpochPlan:  # noqa: ANN001
    sampler = GroupSampler(ROWS, 3, "corpus", 400, seed=3)
    return EpochPlan(sampler, global_batch, world, length_key)


@pytest.mark.parametrize(
    ("global_batch", "world", "steps", "last"),
    [(6, 1, 4, 5), (6, 2, 4, 5), (11, 2, 2, 12), (4, 1, 6, 3), (4, 4, 5, 7), (22, 2, 1, 23)],
)
def test_steps_per_epoch_is_the_number_of_batches_the_plan_makes(
    global_batch: int, world: int, steps: int, last: int
) -> None:
    """A last batch smaller than the process count (23 = 2 x 11 + 1 over 2 processes) joins
    the one before: every process gets a query, and the count is known without sampling."""
    made = plan(global_batch, world)
    batches = made.batches(0)
    assert steps_per_epoch(23, global_batch, world) == made.steps_per_epoch == len(batches) == steps
    assert len(batches[-1]) == last
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))


def test_rows_at_walks_the_epochs_in_order() -> None:
    made = plan(6)
    first = [made.rows_at(step) for step in range(8)]
    assert [epoch for epoch, _ in first] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.tolist() for _, r in first[:4]] == [b.tolist() for b in made.batches(0)]
    assert [r.tolist() for _, r in first[4:]] == [b.tolist() for b in made.batches(1)]


def test_length_grouped_batches_keep_the_steps_and_rows() -> None:
    made = plan(6, length_key=lambda group: group.query)
    batches = made.batches(0)
    assert len(batches) == made.steps_per_epoch
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    # Inside a pool rows are sorted by the key (the query id here), longest first.
    assert all(list(b) == sorted(b, reverse=True) for b in batches[:-1] if len(b) == 6)


def test_a_run_covers_its_epochs_whole_or_in_part() -> None:
    assert total_steps(4, 3, 0) == 12 and total_steps(4, 3, 5) == 5
    config = TrainConfig(batch_size=6, epochs=2)
    assert run_epochs(config, 23) == 2
    config.max_steps = 6
    assert run_epochs(config, 23) == pytest.approx(1 + 12 / 23) == epochs_of_run(6, 23, 6)


def test_coverage_of_steps_replays_the_plan() -> None:
    made = plan(6)
    coverage = made.coverage_of(4)  # one epoch: every row once, 2 of its 2 negatives
    assert coverage.used == coverage.total == 46
