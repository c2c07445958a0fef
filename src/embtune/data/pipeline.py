"""The data half of a training setup, shared by `embtune train` and `embtune inspect`:
validated records -> id rows (instructions applied) -> the negatives budget of the run.

Both commands call these, so `inspect` with a run's options shows what that run will do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embtune.data.epoch_plan import epochs_of_run, steps_per_epoch, total_steps
from embtune.data.formats import TrainingData
from embtune.data.groups import (
    NegativesBudget,
    TrainingTexts,
    TrainRow,
    build_rows,
    negatives_budget,
)

if TYPE_CHECKING:
    from embtune.config import TrainConfig


def training_texts(
    data: TrainingData,
    query_instruction: str,
    passage_instruction: str,
    prompt_format: str = "{}{}",
) -> TrainingTexts:
    """Text stores and id rows of ``data``; a BEIR corpus joins the passages (the pool that
    ``--negative-fill corpus`` draws from). A row's prompt is put in ``prompt_format``
    (--query-instruction-format), as the query instruction is."""
    return build_rows(
        data.records,
        query_instruction,
        passage_instruction,
        list(data.corpus.values()),
        prompt_format,
    )


def run_epochs(config: TrainConfig, rows: int, world: int = 1) -> float:
    """Epochs the run covers: ``--epochs``, or the share of them ``--max-steps`` gives."""
    global_batch = config.batch_size * world
    per_epoch = steps_per_epoch(rows, global_batch, world)
    steps = total_steps(per_epoch, config.epochs, config.max_steps)
    return epochs_of_run(steps, rows, global_batch, world)


def negatives_budget_for(
    config: TrainConfig, rows: list[TrainRow], world: int = 1, in_batch_scoring: bool = True
) -> NegativesBudget:
    """The negatives budget of ``config`` on ``rows`` launched with ``world`` processes;
    ``in_batch_scoring`` False for a model kind that scores a query against its own group
    only (a cross-encoder)."""
    return negatives_budget(
        rows,
        config.train_group_size,
        config.batch_size,
        config.in_batch_negatives and in_batch_scoring,
        config.negative_fill,
        epochs=run_epochs(config, len(rows), world),
        sampling=config.negative_sampling,
        world_size=world,
        cross_device=config.negatives_cross_device,
    )
