"""Group sampler: FlagEmbedding's train_group_size, the fill policies, seeding, the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embtune.choices import NEGATIVE_FILL_POLICIES
from embtune.data.epoch_plan import EpochPlan
from embtune.data.groups import (
    Group,
    GroupSampler,
    NegativeCoverage,
    TrainRow,
    expected_unseen,
    negatives_budget,
)

PASSAGES = 100  # size of the passage store in these tests


def row(pos: list[int], neg: list[int], query: int = 0) -> TrainRow:
    return TrainRow(
        query=query, pos=np.array(pos, dtype=np.int64), neg=np.array(neg, dtype=np.int64)
    )


def sampler(
    rows: list[TrainRow],
    size: int,
    fill: str = "corpus",
    seed: int = 0,
    passages=PASSAGES,
    sampling: str = "random",
):
    return GroupSampler(rows, size, fill, passages, seed, negative_sampling=sampling)


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
        assert [x.tolist() for x in EpochPlan(a, 5).batches(epoch)] == [
            x.tolist() for x in EpochPlan(b, 5).batches(epoch)
        ]


def test_another_seed_gives_other_groups_and_batches() -> None:
    a, b = sampler(MANY, 4, seed=7, passages=400), sampler(MANY, 4, seed=8, passages=400)
    assert [g.passages for g in all_groups(a)] != [g.passages for g in all_groups(b)]
    assert a.epoch_order(0).tolist() != b.epoch_order(0).tolist()


def test_groups_do_not_depend_on_the_batch_size() -> None:
    s = sampler(MANY, 4, seed=3, passages=400)

    def by_row(batch_size: int) -> dict[int, list[int]]:
        return {
            int(r): s.group(int(r), 1).passages
            for b in EpochPlan(s, batch_size).batches(1)
            for r in b
        }

    assert by_row(2) == by_row(5) == by_row(23)


@pytest.mark.parametrize("batch_size", [1, 4, 5, 23, 50])
def test_batches_visit_every_row_exactly_once_per_epoch(batch_size: int) -> None:
    s = sampler(MANY, 4, passages=400)
    for epoch in range(3):
        batches = EpochPlan(s, batch_size).batches(epoch)
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
    assert b.lines()[:5] == [
        "rows (queries): 1",
        "negatives per query in the data: min 10, median 10, max 10",
        "negatives used per query per step: 3 (train_group_size - 1)",
        "candidates each query is scored against: 4",
        "loss at chance level: ln(4) = 1.386",
    ]
    # The one line after them is the negatives never shown (3 of 10 per epoch: 70%).
    assert b.lines()[5:] == [
        "negatives never shown over 1 epoch: 70% expected (--negative-sampling random)"
    ]


# --- negative sampling: random stays as it was, cycle covers every negative ------------------

MIXED = [row([0, 1, 2], list(range(10, 30))), row([3], list(range(30, 40)), 1)]
MIXED += [row([4], [40], 2), row([5], [], 3)]

# Groups of MIXED (G=4, seed 7, epochs 0 and 1) from before the sampling policies existed.
RANDOM_BEFORE = {
    "corpus": [[2, 21, 27, 22], [3, 35, 39, 37], [4, 40, 97, 3], [5, 41, 77, 45]]
    + [[2, 26, 12, 23], [3, 30, 31, 36], [4, 40, 68, 92], [5, 59, 51, 21]],
    "repeat": [[2, 21, 27, 22], [3, 35, 39, 37], [4, 40, 40, 40], [5, 41, 77, 45]]
    + [[2, 26, 12, 23], [3, 30, 31, 36], [4, 40, 40, 40], [5, 59, 51, 21]],
    "shrink": [[2, 21, 27, 22], [3, 35, 39, 37], [4, 40], [5]]
    + [[2, 26, 12, 23], [3, 30, 31, 36], [4, 40], [5]],
}


@pytest.mark.parametrize("fill", ["corpus", "repeat", "shrink"])
def test_random_sampling_draws_exactly_what_it_drew_before_the_policies(fill: str) -> None:
    for s in (GroupSampler(MIXED, 4, fill, PASSAGES, 7), sampler(MIXED, 4, fill, seed=7)):
        assert [s.group(r, e).passages for e in range(2) for r in range(4)] == RANDOM_BEFORE[fill]


def test_cycle_leaves_rows_without_spare_negatives_as_random_does() -> None:
    few = [row([0], [5, 6, 7]), row([1], [8]), row([2], [])]  # n <= G-1: all used, then filled
    for fill in NEGATIVE_FILL_POLICIES:
        a, b = sampler(few, 4, fill, seed=3), sampler(few, 4, fill, seed=3, sampling="cycle")
        assert [g.passages for g in all_groups(a)] == [g.passages for g in all_groups(b)]


def test_cycle_keeps_the_random_positive() -> None:
    a, b = sampler(MIXED, 4, seed=5), sampler(MIXED, 4, seed=5, sampling="cycle")
    assert [g.passages[0] for g in all_groups(a, 10)] == [g.passages[0] for g in all_groups(b, 10)]


@pytest.mark.parametrize("n", [9, 10, 11, 12, 20])
@pytest.mark.parametrize("size", [2, 4, 7])
def test_cycle_shows_every_negative_in_exactly_ceil_n_over_k_epochs(n: int, size: int) -> None:
    k = size - 1
    rows = [row([0], list(range(100 + 100 * i, 100 + 100 * i + n)), query=i) for i in range(6)]
    s = sampler(rows, size, seed=11, passages=1000, sampling="cycle")
    needed = math.ceil(n / k)
    for i, r in enumerate(rows):
        seen: set[int] = set()
        for epoch in range(needed):
            negatives = s.group(i, epoch).passages[1:]
            fresh = set(negatives) - seen
            # Nothing repeats before every negative was shown: each epoch brings k new ones,
            # the last the rest (topped up with ones shown already).
            assert len(fresh) == min(k, n - len(seen))
            seen |= fresh
            assert (len(seen) == n) == (epoch == needed - 1)
        assert seen == set(r.neg.tolist())


def test_cycle_groups_are_full_and_hold_no_duplicate() -> None:
    s = sampler(MIXED, 8, seed=2, sampling="cycle")
    for g in all_groups(s, epochs=12):
        r = MIXED[g.row]
        if len(r.neg) > 7:
            assert len(g.passages) == 8 == len(set(g.passages))
            assert set(g.passages[1:]) <= set(r.neg.tolist())
            assert (g.filled, g.duplicates) == (0, 0)


def test_cycle_shows_each_negative_once_per_pass_and_reshuffles_between_passes() -> None:
    s = sampler(MIXED, 4, seed=9, sampling="cycle")  # row 1: 10 negatives, 3 per epoch, 4 epochs
    passes = [[s.group(1, e).passages[1:] for e in range(p * 4, p * 4 + 4)] for p in range(3)]
    for groups in passes:
        shown = [n for g in groups for n in g]
        assert set(shown) == set(range(30, 40)) and len(shown) == 12  # 2 repeats in the last
    assert passes[0] != passes[1] != passes[2]


def test_cycle_is_a_pure_function_of_seed_epoch_and_row() -> None:
    a = sampler(MANY, 4, seed=7, passages=400, sampling="cycle")
    b = sampler(MANY, 4, seed=7, passages=400, sampling="cycle")
    backwards = {(r, e): b.group(r, e).passages for e in reversed(range(9)) for r in range(23)}
    forwards = {(r, e): a.group(r, e).passages for e in range(9) for r in range(23)}
    assert forwards == backwards
    c = sampler(MANY, 4, seed=8, passages=400, sampling="cycle")
    assert [g.passages for g in all_groups(a)] != [g.passages for g in all_groups(c)]


def test_an_unknown_sampling_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="negative_sampling"):
        sampler(FEW, 4, sampling="greedy")


def test_the_sampling_policy_is_part_of_the_sampler_state() -> None:
    cycle = sampler(MIXED, 4, sampling="cycle")
    assert cycle.state_dict()["negative_sampling"] == "cycle"
    with pytest.raises(ValueError, match="negative_sampling 'random' != 'cycle'"):
        cycle.load_state_dict(sampler(MIXED, 4).state_dict())
    older = {k: v for k, v in sampler(MIXED, 4).state_dict().items() if k != "negative_sampling"}
    sampler(MIXED, 4).load_state_dict(older)  # checkpoints from before the option: random
    with pytest.raises(ValueError, match="negative_sampling"):
        cycle.load_state_dict(older)


# --- coverage of the data's negatives -----------------------------------------------------------


def test_coverage_counts_the_rows_own_negatives_once() -> None:
    rows = [row([0], [5, 6, 7, 8]), row([1], [6, 9]), row([2], [])]
    coverage = NegativeCoverage(rows)
    assert (coverage.used, coverage.total, coverage.fraction) == (0, 6, 0.0)
    coverage.add(Group(0, 0, [0, 5, 6, 50], filled=1))  # 50: a corpus passage, not counted
    coverage.add(Group(0, 0, [0, 6, 6, 6], filled=2, duplicates=2))  # repeats count once
    coverage.add(Group(1, 1, [1, 6]))  # text 6 again, but another row's negative
    coverage.add(Group(2, 2, [2, 70, 71], filled=2))  # a row without negatives
    coverage.add(Group(1, 1, [1]))
    assert (coverage.used, coverage.total) == (3, 6)
    assert coverage.fraction == pytest.approx(0.5)


def test_coverage_of_data_without_negatives_is_complete() -> None:
    assert NegativeCoverage([row([0], [])]).fraction == 1.0
    assert NegativeCoverage([]).fraction == 1.0


def test_coverage_of_a_run_replays_what_training_would_draw() -> None:
    s = sampler(MANY, 4, seed=1, passages=400)
    # A training loop, process by process (2 processes x batch 3 = 6 queries per step).
    direct = NegativeCoverage(MANY)
    per_epoch = math.ceil(23 / 6)
    for step in range(7):
        epoch, index = divmod(step, per_epoch)
        rows = EpochPlan(s, 6).batches(epoch)[index]
        for process in range(2):
            for r in rows[process * 3 : (process + 1) * 3]:
                direct.add(s.group(int(r), epoch))
    replayed = EpochPlan(s, 6).coverage_of(7)
    assert (replayed.used, replayed.total) == (direct.used, direct.total)
    assert replayed.total == 230 and 0 < replayed.used < 230


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_cycle_coverage_of_a_run_is_what_the_budget_predicts(epochs: int) -> None:
    rows = [row([0], list(range(100 + 20 * i, 100 + 20 * i + 3 + i % 9)), i) for i in range(30)]
    s = sampler(rows, 4, seed=4, passages=800, sampling="cycle")
    coverage = EpochPlan(s, 8).coverage_of(epochs * math.ceil(30 / 8))
    budget = negatives_budget(rows, 4, 8, True, "corpus", epochs=epochs, sampling="cycle")
    assert coverage.used == sum(min(len(r.neg), 3 * epochs) for r in rows)
    assert coverage.fraction == pytest.approx(1 - budget.unseen_negative_fraction)
    assert (coverage.fraction == 1.0) == (epochs >= 4)  # the largest row has 11 negatives


def test_random_coverage_of_a_run_is_near_the_budgets_expectation() -> None:
    rows = [row([0], list(range(100 + 10 * i, 110 + 10 * i)), i) for i in range(1500)]
    s = sampler(rows, 4, seed=6, passages=20000)
    coverage = EpochPlan(s, 50).coverage_of(2 * 1500 // 50)  # 2 epochs
    expected = 1 - expected_unseen(10, 3, 2.0, "random")  # 1 - 0.7**2 = 0.51
    assert expected == pytest.approx(0.51)
    assert coverage.fraction == pytest.approx(expected, abs=0.02)
