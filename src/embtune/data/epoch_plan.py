"""The epoch plan: the one place that decides batch order and steps per epoch.

Training asks it for the rows of every step, the negatives budget and `embtune inspect` for
how many epochs a run covers, a resumed run for the coverage of the steps it did not redo.
Orders (the strategies): a seeded shuffle of the rows (default), or, with ``--group-by-length``,
pools of nearby lengths (data/length_grouping.py). A later strategy (same-source batches) is one
more branch of :meth:`EpochPlan.batches`, and every caller follows.

A global batch holds ``batch_size x processes`` rows; each process takes its share of it
(training/loop.py). An epoch's last batch is smaller; one smaller than the process count
would leave a process with no query, so it joins the batch before it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from embtune.data.groups import Group, GroupSampler, NegativeCoverage
from embtune.data.length_grouping import length_grouped_batches


def steps_per_epoch(rows: int, global_batch: int, world: int = 1) -> int:
    """Steps in one pass over ``rows``: the last batch is smaller, and joins the one before
    it when it has fewer rows than there are processes (``world``)."""
    steps = -(-rows // global_batch) if rows else 0
    if steps > 1 and 0 < rows % global_batch < world:
        steps -= 1
    return steps


def epochs_of_run(steps: int, rows: int, global_batch: int, world: int = 1) -> float:
    """How many epochs ``steps`` steps cover: whole epochs plus the share of rows visited in a
    last, unfinished one (what ``--max-steps`` gives; the ``epochs`` of the negatives budget).
    """
    per_epoch = steps_per_epoch(rows, global_batch, world)
    if not per_epoch:
        return 0.0
    full, partial = divmod(steps, per_epoch)
    return full + min(1.0, partial * global_batch / rows)


def total_steps(per_epoch: int, epochs: int, max_steps: int) -> int:
    """Steps of a run: ``--max-steps`` overrides ``--epochs`` (as in Hugging Face's Trainer),
    also beyond them."""
    return max_steps or per_epoch * epochs


class EpochPlan:
    """Which rows every step trains on, for a sampler and a global batch size.

    ``length_key(group)`` (larger = longer) turns on length grouping; the model kind supplies
    it, because only it knows what a group's length is (longest passage, then query, for a
    bi-encoder).
    """

    def __init__(
        self,
        sampler: GroupSampler,
        global_batch: int,
        world: int = 1,
        length_key: Callable[[Group], int] | None = None,
    ) -> None:
        self.sampler = sampler
        self.global_batch = global_batch
        self.world = world
        self.length_key = length_key
        self.steps_per_epoch = steps_per_epoch(len(sampler.rows), global_batch, world)
        self._epoch: tuple[int, list[np.ndarray]] = (-1, [])

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (row indices) of an epoch, in training order."""
        order = self.sampler.epoch_order(epoch)
        if self.length_key is not None:
            keys = np.zeros(len(self.sampler.rows), dtype=np.int64)
            for row in order.tolist():
                keys[row] = self.length_key(self.sampler.group(row, epoch))
            seed = self.sampler.seed
            batches = length_grouped_batches(order, keys, self.global_batch, seed, epoch)
        else:
            size = self.global_batch
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    def rows_at(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, global batch of row indices) of step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.batches(epoch))
        return epoch, self._epoch[1][index]

    def epochs_of(self, steps: int) -> float:
        """How many epochs ``steps`` steps cover (see :func:`epochs_of_run`)."""
        return epochs_of_run(steps, len(self.sampler.rows), self.global_batch, self.world)

    def coverage_of(self, steps: int) -> NegativeCoverage:
        """The negatives the first ``steps`` steps trained on (every process's share).

        Groups are pure functions of (seed, epoch, row), so this gives a resumed run the
        coverage of its steps before the resume without any saved state.
        """
        coverage = NegativeCoverage(self.sampler.rows)
        for step in range(steps if self.steps_per_epoch else 0):
            epoch, rows = self.rows_at(step)
            for row in rows.tolist():
                coverage.add(self.sampler.group(row, epoch))
        return coverage
