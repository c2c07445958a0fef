"""Teacher scores (``pos_scores`` / ``neg_scores``) from the data file to the training group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from embtune.checkpoint import data_fingerprint
from embtune.choices import NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES
from embtune.data.formats import Record, read_flag_jsonl
from embtune.data.groups import Group, GroupSampler, TrainingTexts, TrainRow, build_rows
from tests.conftest import FLAG_DIR

NLI_FILE = FLAG_DIR / "examples_finetune_embedder_example_data_retrieval_nli.jsonl"
MSMARCO_FILE = FLAG_DIR / "examples_finetune_embedder_example_data_retrieval_msmarco.jsonl"
TOY_FILE = FLAG_DIR / "research_old-examples_finetune_toy_finetune_data.jsonl"  # no scores
PROMPTED_FILE = FLAG_DIR / "research_llm_reranker_toy_finetune_data.jsonl"  # prompts, no scores


def text_scores(texts: TrainingTexts, row: TrainRow) -> dict[str, float]:
    """The row's scores by passage text (what the data file pairs them with)."""
    pairs = zip(row.pos.tolist(), row.pos_scores.tolist(), strict=True)
    pairs = [*pairs, *zip(row.neg.tolist(), row.neg_scores.tolist(), strict=True)]
    return {texts.passages.texts[pid]: score for pid, score in pairs}


# --- reading and build_rows --------------------------------------------------------------------


def test_scores_are_read_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    row = {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [0]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (rec,) = read_flag_jsonl([path])
    assert (rec.pos_scores, rec.neg_scores) == ([1.0], [0.0])
    assert all(type(s) is float for s in [*rec.pos_scores, *rec.neg_scores])


def test_a_row_without_scores_has_none() -> None:
    (row,) = build_rows([Record(query="q", pos=["p"], neg=["n"])]).rows
    assert (row.pos_scores, row.neg_scores, row.has_scores) == (None, None, False)


def test_scores_follow_their_ids_through_sorting() -> None:
    rec = Record(
        query="q",
        pos=["p2", "p1"],
        neg=["n3", "n1", "n2"],
        pos_scores=[0.9, 0.8],
        neg_scores=[0.3, 0.1, 0.2],
    )
    texts = build_rows([Record(query="x", pos=["n2", "n1", "p1"]), rec])
    row = texts.rows[1]
    assert list(row.pos) == sorted(row.pos) and list(row.neg) == sorted(row.neg)
    assert text_scores(texts, row) == {"p2": 0.9, "p1": 0.8, "n3": 0.3, "n1": 0.1, "n2": 0.2}


def test_a_repeated_text_keeps_its_first_score() -> None:
    rec = Record(
        query="q",
        pos=["p", "p", "p2"],
        neg=["n", "m", "n"],
        pos_scores=[0.9, 0.1, 0.7],
        neg_scores=[0.3, 0.4, 0.5],
    )
    texts = build_rows([rec])
    (row,) = texts.rows
    assert (len(row.pos), len(row.neg)) == (2, 2)
    assert text_scores(texts, row) == {"p": 0.9, "p2": 0.7, "n": 0.3, "m": 0.4}


def test_a_negative_that_is_also_a_positive_is_dropped_with_its_score() -> None:
    rec = Record(
        query="q",
        pos=["a", "b"],
        neg=["c", "a", "d"],
        pos_scores=[0.9, 0.8],
        neg_scores=[0.3, 0.95, 0.1],
    )
    texts = build_rows([rec])
    (row,) = texts.rows
    assert text_scores(texts, row) == {"a": 0.9, "b": 0.8, "c": 0.3, "d": 0.1}
    assert len(row.neg_scores) == len(row.neg) == 2


def test_one_sided_scores_leave_the_other_side_none() -> None:
    (row,) = build_rows([Record(query="q", pos=["p"], neg=["n"], neg_scores=[0.2])]).rows
    assert row.pos_scores is None and row.neg_scores.tolist() == [0.2]
    assert row.has_scores


@pytest.mark.parametrize("path", [NLI_FILE, MSMARCO_FILE], ids=lambda p: p.stem)
def test_the_flagembedding_examples_keep_every_score(path: Path) -> None:
    records = read_flag_jsonl([path])
    texts = build_rows(records)
    for rec, row in zip(records, texts.rows, strict=True):
        want = dict(zip(rec.neg, rec.neg_scores, strict=True))
        want.update(zip(rec.pos, rec.pos_scores, strict=True))  # a positive wins over a negative
        got = text_scores(texts, row)
        assert got == {t: want[t] for t in got}
        assert set(got) == set(want)


# --- groups ------------------------------------------------------------------------------------

PASSAGES = 100


def scored_row(pos: list[int], neg: list[int], query: int = 0) -> TrainRow:
    """A row whose score of passage id ``i`` is ``i / 1000`` (easy to check in a group)."""
    return TrainRow(
        query=query,
        pos=np.array(pos, dtype=np.int64),
        neg=np.array(neg, dtype=np.int64),
        pos_scores=np.array(pos, dtype=np.float64) / 1000,
        neg_scores=np.array(neg, dtype=np.float64) / 1000,
    )


ROWS = [
    scored_row([0, 1, 2], list(range(10, 30)), query=0),  # more negatives than a group takes
    scored_row([3], [40, 41], query=1),  # too few
    scored_row([4], [], query=2),  # none
    scored_row([5], list(range(50, 53)), query=3),  # exactly G - 1 for G = 4
]


def check_scores(group: Group, row: TrainRow) -> None:
    """Each passage's score is its own; passages the row does not have get NaN."""
    own = {*row.pos.tolist(), *row.neg.tolist()}
    assert group.scores is not None and len(group.scores) == len(group.passages)
    for pid, score in zip(group.passages, group.scores, strict=True):
        if pid in own:
            assert score == pid / 1000
        else:
            assert math.isnan(score)
    assert sum(math.isnan(s) for s in group.scores) == (0 if group.duplicates else group.filled)


@pytest.mark.parametrize("fill", NEGATIVE_FILL_POLICIES)
@pytest.mark.parametrize("sampling", NEGATIVE_SAMPLING_POLICIES)
@pytest.mark.parametrize("size", [1, 4, 8])
def test_group_scores_are_aligned_with_the_passages(fill: str, sampling: str, size: int) -> None:
    s = GroupSampler(ROWS, size, fill, PASSAGES, seed=3, negative_sampling=sampling)
    for epoch in range(6):
        for r, row in enumerate(ROWS):
            check_scores(s.group(r, epoch), row)


def test_corpus_fill_scores_are_nan() -> None:
    g = GroupSampler(ROWS, 4, "corpus", PASSAGES, seed=0).group(2, 0)
    assert g.filled == 3 and g.scores[0] == 0.004
    assert all(math.isnan(s) for s in g.scores[1:])


def test_repeat_fill_keeps_the_repeated_negatives_own_score() -> None:
    g = GroupSampler(ROWS, 6, "repeat", PASSAGES, seed=0).group(1, 0)
    assert (g.filled, g.duplicates) == (3, 3)
    assert g.scores == [p / 1000 for p in g.passages]


def test_one_sided_scores_give_nan_for_the_other_side() -> None:
    row = TrainRow(query=0, pos=np.array([0]), neg=np.array([7, 8]), neg_scores=np.array([1, 2.0]))
    g = GroupSampler([row], 3, "corpus", PASSAGES, seed=0).group(0, 0)
    assert math.isnan(g.scores[0])
    assert g.scores[1:] == [{7: 1.0, 8: 2.0}[p] for p in g.passages[1:]]


def test_a_row_without_scores_gives_groups_without_scores() -> None:
    row = TrainRow(query=0, pos=np.array([0]), neg=np.array([7, 8]))
    assert GroupSampler([row], 3, "corpus", PASSAGES, seed=0).group(0, 0).scores is None


def test_scores_do_not_change_which_passages_are_drawn() -> None:
    bare = [TrainRow(query=r.query, pos=r.pos, neg=r.neg) for r in ROWS]
    for fill in NEGATIVE_FILL_POLICIES:
        for sampling in NEGATIVE_SAMPLING_POLICIES:
            a = GroupSampler(ROWS, 4, fill, PASSAGES, seed=9, negative_sampling=sampling)
            b = GroupSampler(bare, 4, fill, PASSAGES, seed=9, negative_sampling=sampling)
            for epoch in range(4):
                for r in range(len(ROWS)):
                    ga, gb = a.group(r, epoch), b.group(r, epoch)
                    assert (ga.passages, ga.filled, ga.duplicates) == (
                        gb.passages,
                        gb.filled,
                        gb.duplicates,
                    )


def test_scores_of_real_data_reach_the_groups() -> None:
    records = read_flag_jsonl([MSMARCO_FILE])
    texts = build_rows(records)
    s = GroupSampler(texts.rows, 4, "corpus", len(texts.passages), seed=0)
    for r, rec in enumerate(records):
        g = s.group(r, 0)
        by_text = dict(zip(rec.neg, rec.neg_scores, strict=True))
        by_text.update(zip(rec.pos, rec.pos_scores, strict=True))
        assert g.scores == [by_text[texts.passages.texts[p]] for p in g.passages]


# --- fingerprint -------------------------------------------------------------------------------

UNSCORED = [
    Record(query="q", pos=["p"], neg=["n1", "n2"], prompt="Find: "),
    Record(query="r", pos=["s", "t"]),
]
# data_fingerprint values computed before scores were part of the fingerprint: checkpoints of
# data without scores must keep resuming.
UNSCORED_FINGERPRINT = "8d306244d0bc3ba75d5fa0f72b59940ae624eef049beb2bf6edcbc39b59ba8e2"
TOY_FINGERPRINT = "9024405921626252e96ca0d6beec66b29ce0effc2753f3397edefb269be41777"
PROMPTED_FINGERPRINT = "17c45084f2557ee23bf8b183e2626b5c63cec571dc90cbdbe4fe48b6b03a5f16"


def test_the_fingerprint_of_data_without_scores_is_unchanged() -> None:
    assert data_fingerprint(UNSCORED, ["extra passage"]) == UNSCORED_FINGERPRINT
    assert data_fingerprint(read_flag_jsonl([TOY_FILE])) == TOY_FINGERPRINT
    assert data_fingerprint(read_flag_jsonl([PROMPTED_FILE])) == PROMPTED_FINGERPRINT


def scored(pos_scores: list[float] | None, neg_scores: list[float] | None) -> list[Record]:
    first = Record(
        query="q", pos=["p"], neg=["n1", "n2"], pos_scores=pos_scores, neg_scores=neg_scores
    )
    return [first, UNSCORED[1]]


def test_the_fingerprint_sees_the_scores() -> None:
    base = data_fingerprint(scored([0.9], [0.1, 0.2]))
    assert data_fingerprint(scored([0.9], [0.1, 0.2])) == base
    assert data_fingerprint(scored([0.9], [0.1, 0.25])) != base
    assert data_fingerprint(scored([0.8], [0.1, 0.2])) != base
    assert data_fingerprint(scored([0.9], [0.2, 0.1])) != base
    assert data_fingerprint(scored([0.9], None)) != base
    assert data_fingerprint(scored(None, [0.1, 0.2])) != base
    assert data_fingerprint(scored(None, None)) != base


def test_the_fingerprint_tells_missing_scores_from_an_empty_list() -> None:
    none = [Record(query="q", pos=["p"], pos_scores=[1.0], neg_scores=None)]
    empty = [Record(query="q", pos=["p"], pos_scores=[1.0], neg_scores=[])]
    assert data_fingerprint(none) != data_fingerprint(empty)
