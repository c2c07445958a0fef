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
    row_prompts: str = "always",
) -> TrainingTexts:
    """Text stores and id rows of ``data``; a BEIR corpus joins the passages (the pool that
    ``--negative-fill corpus`` draws from). A row's prompt, where ``row_prompts``
    (--row-prompts) applies it, is put in ``prompt_format`` (--query-instruction-format), as
    the query instruction is."""
    return build_rows(
        data.records,
        query_instruction,
        passage_instruction,
        list(data.corpus.values()),
        prompt_format,
        row_prompts_apply(row_prompts, query_instruction),
    )


def row_prompts_apply(rule: str, query_instruction: str) -> bool:
    """Whether rows' own prompts replace the query instruction under ``--row-prompts rule``.

    flagembedding: only when there is a query instruction, as FlagEmbedding's training dataset
    does (``AbsEmbedderTrainDataset.__getitem__`` formats ``data['prompt']`` only under
    ``query_instruction_for_retrieval is not None``); always; never.
    """
    return rule == "always" or (rule == "flagembedding" and bool(query_instruction))


def row_prompt_summary(records: list, rule: str, query_instruction: str) -> dict | None:
    """What the rows' prompts did in this run, for the console and train_summary.json (None
    when no row has one): how many rows and distinct prompts, whether they were used, and the
    query prompt the saved model gets (the instruction: rows' own prompts are not saved)."""
    prompts = [r.prompt for r in records if r.prompt is not None]
    if not prompts:
        return None
    return {
        "rule": rule,
        "rows_with_prompt": len(prompts),
        "distinct_prompts": len(set(prompts)),
        "used": row_prompts_apply(rule, query_instruction),
        "saved_query_prompt": query_instruction,
    }


def row_prompt_line(summary: dict) -> str:
    """One console line for :func:`row_prompt_summary`'s result."""
    counted = (
        f"{summary['rows_with_prompt']} rows carry their own prompt "
        f"({summary['distinct_prompts']} distinct)"
    )
    saved = summary["saved_query_prompt"]
    if not summary["used"]:
        why = (
            "no query instruction is set (--row-prompts flagembedding, FlagEmbedding's rule; "
            "--row-prompts always uses them)"
            if summary["rule"] == "flagembedding"
            else "--row-prompts never"
        )
        return f"{counted}: not used, {why}"
    default = f"the instruction {saved!r}" if saved else "no prompt"
    return (
        f"{counted}: each replaces the query instruction for its row; the saved model's "
        f"default query prompt is {default}: give a row's prompt at inference for its task"
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
