"""Negatives budget: exact arithmetic on constructed data, and the findings it warns with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embtune.data.epoch_plan import epochs_of_run
from embtune.data.groups import (
    TrainRow,
    expected_unseen,
    negatives_budget,
)

REQUIRED_KEYS = {
    "rows",
    "negatives_per_query",
    "negatives_used_per_step",
    "candidates_per_query",
    "unseen_negative_fraction",
    "rows_needing_fill",
}


def rows_with(*negatives: int) -> list[TrainRow]:
    """One row per count, each with that many distinct negatives of its own."""
    return [
        TrainRow(
            query=i,
            pos=np.array([i], dtype=np.int64),
            neg=np.arange(1000 + 100 * i, 1000 + 100 * i + n, dtype=np.int64),
        )
        for i, n in enumerate(negatives)
    ]


def budget(rows: list[TrainRow], size: int = 4, batch: int = 8, **options):
    in_batch = options.pop("in_batch", True)
    fill = options.pop("fill", "corpus")
    return negatives_budget(rows, size, batch, in_batch, fill, **options)


# --- the story: 1, 4 and 10 negatives per query at train_group_size 4 ---------------------------


def test_every_dataset_uses_three_negatives_per_step_at_group_size_four() -> None:
    for n in (1, 4, 10):
        assert budget(rows_with(*[n] * 12)).negatives_used_per_step == 3


def test_one_negative_per_query_needs_filling() -> None:
    b = budget(rows_with(*[1] * 12))
    assert (b.rows_needing_fill, b.rows_without_negatives, b.unseen_negative_fraction) == (12, 0, 0)
    assert b.filled_slot_fraction == pytest.approx(2 / 3)
    [finding] = b.findings()
    assert finding == (
        "12 of 12 rows have fewer than 3 negatives: their groups are completed with random "
        "corpus passages (easy negatives; 67% of all negative slots). Lower --train-group-size "
        "or mine more negatives (embtune mine)."
    )


def test_four_negatives_per_query_leave_a_quarter_unseen_and_no_finding() -> None:
    b = budget(rows_with(*[4] * 12))
    assert b.rows_needing_fill == 0
    assert b.unseen_negative_fraction == pytest.approx(0.25)
    assert b.findings() == []


def test_ten_negatives_per_query_leave_most_unseen() -> None:
    b = budget(rows_with(*[10] * 12))
    assert b.unseen_negative_fraction == pytest.approx(0.7)
    assert b.findings() == [
        "every query has 10 negatives but train_group_size=4 uses 3 per step: over 1 epoch 70% "
        "of negatives are never seen. Raise --train-group-size (memory grows linearly), train "
        "more epochs, or use --negative-sampling cycle (every negative within 4 epochs)."
    ]
    assert "negatives never shown over 1 epoch: 70% expected (--negative-sampling random)" in (
        b.lines()
    )


def test_the_unseen_finding_under_cycle_names_the_epochs_needed() -> None:
    [finding] = budget(rows_with(10, 4, 9), sampling="cycle").findings()
    assert finding.startswith("queries have 4 to 10 negatives (median 9) but train_group_size=4")
    assert finding.endswith("train 4 epochs (cycle then shows every negative).")


@pytest.mark.parametrize("fill", ["corpus", "repeat", "shrink"])
@pytest.mark.parametrize("sampling", ["random", "cycle"])
@pytest.mark.parametrize("epochs", [0.5, 1.0, 3.0])
def test_balanced_data_gives_no_finding(fill: str, sampling: str, epochs: float) -> None:
    for size in (2, 4, 8):
        b = budget(rows_with(*[size - 1] * 20), size, fill=fill, sampling=sampling, epochs=epochs)
        assert b.findings() == []
        assert b.rows_needing_fill == 0
        assert b.unseen_negative_fraction == pytest.approx(1 - epochs if epochs < 1 else 0)


def test_a_run_shorter_than_an_epoch_is_flagged_as_such() -> None:
    [finding] = budget(rows_with(*[3] * 20), epochs=0.25).findings()
    assert finding == (
        "the run stops after 0.25 epochs, so 75% of the rows are never visited and 75% of "
        "negatives never seen. Train at least 1 epoch (raise or drop --max-steps)."
    )
    # Too few negatives per step stays the finding when one epoch would not fix it.
    [finding] = budget(rows_with(*[10] * 20), epochs=0.25).findings()
    assert finding.startswith("every query has 10 negatives but train_group_size=4 uses 3")


# --- unseen share: random vs cycle, whole and fractional epochs ----------------------------------


@pytest.mark.parametrize(
    ("epochs", "random", "cycle"),
    [
        (1, 0.7, 0.7),
        (2, 0.49, 0.4),
        (3, 0.343, 0.1),
        (4, 0.2401, 0.0),
        (1.5, 0.7 * 0.85, (0.5 * 7 + 0.5 * 4) / 10),
        (0.5, 0.85, 0.85),
        (0.0, 1.0, 1.0),
    ],
)
def test_unseen_share_of_ten_negatives_three_per_step(
    epochs: float, random: float, cycle: float
) -> None:
    assert expected_unseen(10, 3, epochs, "random") == pytest.approx(random)
    assert expected_unseen(10, 3, epochs, "cycle") == pytest.approx(cycle)
    for sampling, value in (("random", random), ("cycle", cycle)):
        b = budget(rows_with(10, 10), epochs=epochs, sampling=sampling)
        assert b.unseen_negative_fraction == pytest.approx(value)


def test_rows_with_few_negatives_show_them_all_once_visited() -> None:
    assert expected_unseen(3, 3, 1, "random") == expected_unseen(2, 3, 1, "cycle") == 0
    assert expected_unseen(2, 3, 0.25, "random") == pytest.approx(0.75)  # 1 row in 4 visited
    assert expected_unseen(0, 3, 1, "random") == 0


def test_unseen_share_is_weighted_by_each_rows_negatives() -> None:
    rows = rows_with(2, 10, 0)
    assert budget(rows).unseen_negative_fraction == pytest.approx(7 / 12)
    assert budget(rows, epochs=0.5).unseen_negative_fraction == pytest.approx(
        (2 * 0.5 + 10 * 0.85) / 12
    )
    assert budget(rows).negatives_total == 12


def test_group_size_one_shows_no_negative() -> None:
    b = budget(rows_with(5, 5), size=1)
    assert b.unseen_negative_fraction == 1.0
    assert "Raise --train-group-size: 1 is the positive alone." in b.findings()[0]


# --- candidates per query ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "own", "in_batch"),
    [
        ({}, 4, 7 * 4),  # own group + the 7 other queries' groups of the batch
        ({"in_batch": False}, 4, 0),
        ({"world_size": 4}, 4, 7 * 4),  # other processes' passages are not candidates...
        ({"world_size": 2, "cross_device": True}, 4, 15 * 4),  # ...unless gathered
        ({"world_size": 4, "cross_device": True}, 4, 19 * 4),  # capped at the 20 rows
        ({"in_batch": False, "world_size": 4, "cross_device": True}, 4, 0),
        ({"fill": "shrink"}, 2, 7 * 2),  # groups of 1 + the median row's 1.5 -> 1 negative
        ({"fill": "shrink", "in_batch": False}, 2, 0),
        ({"fill": "repeat"}, 4, 7 * 4),
    ],
)
def test_candidates_per_query(options: dict, own: int, in_batch: int) -> None:
    b = budget(rows_with(*[0, 1, 2, 10] * 5), **options)
    assert (b.own_group, b.in_batch_candidates) == (own, in_batch)
    assert b.candidates_per_query == own + in_batch
    assert b.chance_loss == pytest.approx(math.log(own + in_batch))


def test_candidates_with_group_size_one_come_from_the_batch() -> None:
    b = budget(rows_with(3, 3, 3), size=1, batch=8)
    assert (b.own_group, b.candidates_per_query) == (1, 3)


def test_rows_needing_fill_and_the_duplicates_repeat_creates() -> None:
    rows = rows_with(0, 1, 2, 3, 10)
    corpus = budget(rows)
    assert (corpus.rows_needing_fill, corpus.rows_without_negatives) == (3, 1)
    assert corpus.rows_with_duplicate_fill == 0
    assert corpus.filled_slot_fraction == pytest.approx((3 + 2 + 1) / 15)
    repeat = budget(rows, fill="repeat")
    assert (repeat.rows_needing_fill, repeat.rows_with_duplicate_fill) == (3, 2)
    assert any(
        "--negative-fill repeat pads their groups with duplicates" in f for f in (repeat.findings())
    )
    assert budget(rows, fill="shrink").filled_slot_fraction == 0


# --- findings about rows without negatives and the launch ----------------------------------------


def test_rows_without_negatives_are_named_with_what_they_train_on() -> None:
    rows = rows_with(0, 0, 3, 3)

    def no_negatives(**options) -> str:
        return next(f for f in budget(rows, **options).findings() if "no negatives" in f)

    assert no_negatives().startswith(
        "2 of 4 rows have no negatives: every negative in their groups is a random corpus passage"
    )
    assert "in-batch negatives only" in no_negatives(fill="shrink")
    assert "their loss is always 0" in no_negatives(fill="shrink", in_batch=False)
    assert no_negatives().endswith("Mine hard negatives for them (embtune mine).")


def test_cross_device_without_several_processes_or_in_batch_negatives_is_flagged() -> None:
    rows = rows_with(3, 3)
    assert budget(rows, cross_device=True, world_size=4).findings() == []
    [alone] = budget(rows, cross_device=True).findings()
    assert alone.startswith("--negatives-cross-device does nothing with 1 process")
    [no_in_batch] = budget(rows, cross_device=True, world_size=2, in_batch=False).findings()
    assert "does nothing with --no-in-batch-negatives" in no_in_batch


# --- JSON and epochs of a run ------------------------------------------------------------------


def test_json_has_the_documented_keys_and_round_trips() -> None:
    b = budget(rows_with(1, 4, 10), epochs=1.5, sampling="cycle", world_size=2, cross_device=True)
    data = json.loads(json.dumps(b.to_json()))
    assert REQUIRED_KEYS <= data.keys()
    assert data["negatives_per_query"] == {"min": 1, "median": 4.0, "max": 10}
    assert data["negatives_used_per_step"] == 3
    assert data["candidates_per_query"] == 12  # 3 rows x 4 passages, gathered over 2 processes
    assert data["rows_needing_fill"] == 1
    assert data["unseen_negative_fraction"] == pytest.approx(
        (4 * expected_unseen(4, 3, 1.5, "cycle") + 10 * expected_unseen(10, 3, 1.5, "cycle")) / 15
    )
    assert (data["epochs"], data["sampling"], data["world_size"]) == (1.5, "cycle", 2)
    assert data["findings"] == b.findings()


def test_epochs_of_a_run_count_the_rows_an_unfinished_epoch_visits() -> None:
    # 23 rows, 6 per step: 4 steps per epoch, the last with 5 rows.
    assert epochs_of_run(0, 23, 6) == 0
    assert epochs_of_run(4, 23, 6) == 1
    assert epochs_of_run(6, 23, 6) == pytest.approx(1 + 12 / 23)
    assert epochs_of_run(11, 23, 6) == pytest.approx(2 + 18 / 23)
    assert epochs_of_run(8, 0, 6) == 0
