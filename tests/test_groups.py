"""Group sampler: FlagEmbedding's train_group_size, the fill policies, seeding, the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embtune.data.groups import Group, GroupSampler, TrainRow, negatives_budget

PASSAGES = 100  # size of the passage store in these tests


def row(pos: list[int], neg: list[int], query: int = 0) -> TrainRow:
    return TrainRow(
        query=query, pos=np.array(pos, dtype=np.int64), neg=np.array(neg, dtype=np.int64)
    )


def sampler(
    rows: list[TrainRow], size: int, fill: str = "corpus", seed: int = 0, passages=PASSAGES
):
    return GroupSampler(rows, size, fill, passages, seed)


RICH = [row([0, 1, 2], list(range(10, 30)), query=0), row([3], list(range(30, 40)), query=1)]


def all_groups(s: GroupSampler, epochs: int = 5) -> list[Group]:
    return [s.group(r, e) for e in range(epochs) for r in range(len(s.rows))]


# --- rows with enough negatives ---------------------------------------------------------------


def test_a_group_is_one_positive_and_group_size_minus_one_distinct_negatives() -> None:
    s = sampler(RICH, 8)
    for g in all_groups(s, epochs=20):
        r = RICH[g.row]
        assert len(g.passages) == 8
        assert g.passages[0] in r.pos
        assert set(g.passages[1:]) <= set(r.neg.tolist())
        assert len(set(g.passages)) == 8
        assert (g.filled, g.duplicates) == (0, 0)
        assert g.query == r.query


def test_the_positive_is_drawn_among_all_of_the_rows_positives() -> None:
    s = sampler(RICH, 4)
    assert {s.group(0, e).passages[0] for e in range(60)} == {0, 1, 2}


def test_negatives_change_from_epoch_to_epoch() -> None:
    s = sampler(RICH, 4)
    assert len({tuple(sorted(s.group(0, e).passages[1:])) for e in range(10)}) > 1


def test_group_size_one_is_the_positive_alone() -> None:
    g = sampler(RICH, 1).group(1, 0)
    assert g.passages == [3]


# --- fill policies ----------------------------------------------------------------------------

FEW = [row([0, 1], [2, 3]), row([4], [])]


def test_corpus_fill_completes_the_group_without_positives_or_duplicates() -> None:
    for g in all_groups(sampler(FEW, 8, "corpus"), epochs=20):
        r = FEW[g.row]
        assert len(g.passages) == 8
        assert len(set(g.passages)) == 8
        assert g.passages[0] in r.pos
        assert not set(g.passages[1:]) & set(r.pos.tolist())
        assert set(r.neg.tolist()) <= set(g.passages[1:])  # the row's own negatives come first
        assert all(0 <= p < PASSAGES for p in g.passages)
        assert (g.filled, g.duplicates) == (7 - len(r.neg), 0)


def test_corpus_fill_in_a_small_store_takes_what_is_left() -> None:
    rows = [row([0, 1, 2], [3])]
    g = sampler(rows, 8, "corpus", passages=6).group(0, 0)
    assert sorted(g.passages[1:]) == [3, 4, 5]
    assert g.filled == 2


def test_repeat_fill_duplicates_the_rows_own_negatives() -> None:
    for g in [sampler(FEW, 6, "repeat").group(0, e) for e in range(20)]:
        assert len(g.passages) == 6
        assert g.passages[0] in (0, 1)
        assert set(g.passages[1:]) == {2, 3}
        assert (g.filled, g.duplicates) == (3, 3)


def test_repeat_fill_without_any_negative_falls_back_to_the_corpus() -> None:
    for g in [sampler(FEW, 6, "repeat").group(1, e) for e in range(20)]:
        assert g.passages[0] == 4
        assert len(set(g.passages)) == 6
        assert all(0 <= p < PASSAGES for p in g.passages)
        assert (g.filled, g.duplicates) == (5, 0)


def test_shrink_keeps_only_the_negatives_the_row_has() -> None:
    s = sampler(FEW, 6, "shrink")
    first, second = s.group(0, 0), s.group(1, 0)
    assert first.passages[0] in (0, 1) and sorted(first.passages[1:]) == [2, 3]
    assert second.passages == [4]
    assert (first.filled, second.filled) == (0, 0)


def test_an_unknown_fill_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="negative_fill"):
        sampler(FEW, 4, "borrow")


# --- seeding and batches ----------------------------------------------------------------------

MANY = [row([i], list(range(100 + 10 * i, 110 + 10 * i)), query=i) for i in range(23)]


def test_the_same_seed_gives_the_same_groups_and_batches() -> None:
    a, b = sampler(MANY, 4, seed=7, passages=400), sampler(MANY, 4, seed=7, passages=400)
    assert [g.passages for g in all_groups(a)] == [g.passages for g in all_groups(b)]
    for epoch in range(3):
        assert [x.tolist() for x in a.batches(epoch, 5)] == [
            x.tolist() for x in b.batches(epoch, 5)
        ]


def test_another_seed_gives_other_groups_and_batches() -> None:
    a, b = sampler(MANY, 4, seed=7, passages=400), sampler(MANY, 4, seed=8, passages=400)
    assert [g.passages for g in all_groups(a)] != [g.passages for g in all_groups(b)]
    assert a.epoch_order(0).tolist() != b.epoch_order(0).tolist()


def test_groups_do_not_depend_on_the_batch_size() -> None:
    s = sampler(MANY, 4, seed=3, passages=400)

    def by_row(batch_size: int) -> dict[int, list[int]]:
        return {int(r): s.group(int(r), 1).passages for b in s.batches(1, batch_size) for r in b}

    assert by_row(2) == by_row(5) == by_row(23)


@pytest.mark.parametrize("batch_size", [1, 4, 5, 23, 50])
def test_batches_visit_every_row_exactly_once_per_epoch(batch_size: int) -> None:
    s = sampler(MANY, 4, passages=400)
    for epoch in range(3):
        batches = s.batches(epoch, batch_size)
        visited = np.concatenate(batches).tolist()
        assert sorted(visited) == list(range(23))
        assert all(len(b) == batch_size for b in batches[:-1])
        assert 1 <= len(batches[-1]) <= batch_size
    assert s.epoch_order(0).tolist() != s.epoch_order(1).tolist()


# --- negatives budget -------------------------------------------------------------------------

BUDGET_ROWS = [row([0], list(range(1, 1 + n))) for n in (0, 1, 2, 10)]  # median 1.5


def test_budget_with_in_batch_negatives() -> None:
    b = negatives_budget(
        BUDGET_ROWS, train_group_size=4, batch_size=16, in_batch_negatives=True, fill="corpus"
    )
    assert (b.rows, b.negatives_min, b.negatives_median, b.negatives_max) == (4, 0, 1.5, 10)
    assert b.negatives_used_per_step == 3
    assert b.candidates_per_query == 16  # the batch is 4 rows (not 16) x 4 passages
    assert b.rows_needing_fill == 3
    assert b.chance_loss == pytest.approx(math.log(16))
    assert (
        "rows with too few negatives: 3 (filled with random corpus passages; --negative-fill)"
        in b.lines()
    )


def test_budget_with_in_batch_negatives_and_full_batches() -> None:
    b = negatives_budget(
        BUDGET_ROWS, train_group_size=2, batch_size=3, in_batch_negatives=True, fill="repeat"
    )
    assert (b.candidates_per_query, b.rows_needing_fill, b.negatives_used_per_step) == (6, 1, 1)
    assert b.chance_loss == pytest.approx(math.log(6))


def test_budget_without_in_batch_negatives() -> None:
    b = negatives_budget(
        BUDGET_ROWS, train_group_size=4, batch_size=2, in_batch_negatives=False, fill="repeat"
    )
    assert b.candidates_per_query == 4
    assert b.chance_loss == pytest.approx(math.log(4))


def test_budget_with_shrink_counts_the_typical_group() -> None:
    b = negatives_budget(
        BUDGET_ROWS, train_group_size=4, batch_size=2, in_batch_negatives=False, fill="shrink"
    )
    assert b.candidates_per_query == 2  # 1 positive + int(median 1.5) negatives
    assert (
        "rows with too few negatives: 3 (trained with smaller groups; --negative-fill)" in b.lines()
    )


def test_budget_lines_say_nothing_about_fill_when_no_row_needs_it() -> None:
    b = negatives_budget(
        BUDGET_ROWS[3:], train_group_size=4, batch_size=8, in_batch_negatives=True, fill="corpus"
    )
    assert b.rows_needing_fill == 0
    assert b.lines() == [
        "rows (queries): 1",
        "negatives per query in the data: min 10, median 10, max 10",
        "negatives used per query per step: 3 (train_group_size - 1)",
        "candidates each query is scored against: 4",
        "loss at chance level: ln(4) = 1.386",
    ]
