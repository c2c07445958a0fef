"""Contrastive loss against hand computations, and the collate layout the loss relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embtune.data.batching import pad_tokens, padded_width
from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable
from embtune.kinds.bi_encoder import collate
from embtune.objectives.infonce import contrastive_loss

# B = 2 queries, groups of 2 passages (positive first), H = 2.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 1.0]])
OWNER = torch.tensor([0, 0, 1, 1])
POSITIVE = torch.tensor([0, 2])
TAU = 0.5
# q.p / tau, worked out by hand: row b lists passages 0..3.
SCORES = [[2.0, 1.0, 0.0, 2.0], [0.0, 1.0, 2.0, 2.0]]


def nll(scores: list[float], positive: int, candidates: list[int]) -> float:
    """-log softmax(scores over candidates)[positive], in plain float64 arithmetic."""
    return -(scores[positive] - math.log(sum(math.exp(scores[c]) for c in candidates)))


def test_scores_are_dot_products_over_temperature() -> None:
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU)
    assert out.scores.tolist() == SCORES


def test_loss_with_in_batch_negatives() -> None:
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU, in_batch_negatives=True)
    expected = (nll(SCORES[0], 0, [0, 1, 2, 3]) + nll(SCORES[1], 2, [0, 1, 2, 3])) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.candidates.tolist() == [4, 4]


def test_loss_with_only_the_own_group() -> None:
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU, in_batch_negatives=False)
    expected = (nll(SCORES[0], 0, [0, 1]) + nll(SCORES[1], 2, [2, 3])) / 2
    assert expected == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.candidates.tolist() == [2, 2]
    assert torch.isinf(out.scores[0, 2:]).all() and torch.isinf(out.scores[1, :2]).all()


def test_a_false_negative_is_removed_from_that_query_only() -> None:
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 3] = True  # passage 3 is also a positive of query 0
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU, false_negative_mask=mask)
    expected = (nll(SCORES[0], 0, [0, 1, 2]) + nll(SCORES[1], 2, [0, 1, 2, 3])) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.candidates.tolist() == [3, 4]
    assert out.scores[0, 3].item() == float("-inf")
    assert out.scores[1, 3].item() == pytest.approx(2.0)


def test_the_positive_stays_a_candidate_even_if_masked() -> None:
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU, false_negative_mask=mask)
    plain = contrastive_loss(Q, P, POSITIVE, OWNER, TAU)
    assert out.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)


@pytest.mark.parametrize("in_batch", [True, False])
def test_ragged_groups_from_shrink(in_batch: bool) -> None:
    owner = torch.tensor([0, 0, 0, 1])  # query 0 has 3 passages, query 1 only its positive
    positive = torch.tensor([0, 3])
    out = contrastive_loss(Q, P, positive, owner, TAU, in_batch_negatives=in_batch)
    if in_batch:
        cands = [[0, 1, 2, 3], [0, 1, 2, 3]]
    else:
        cands = [[0, 1, 2], [3]]
    expected = (nll(SCORES[0], 0, cands[0]) + nll(SCORES[1], 3, cands[1])) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.candidates.tolist() == [len(c) for c in cands]


def test_identical_embeddings_give_the_chance_level_loss() -> None:
    q, p = torch.ones(3, 4), torch.ones(6, 4)
    owner, positive = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 2, 4])
    assert contrastive_loss(q, p, positive, owner, 0.02).loss.item() == pytest.approx(math.log(6))
    own = contrastive_loss(q, p, positive, owner, 0.02, in_batch_negatives=False)
    assert own.loss.item() == pytest.approx(math.log(2))


def test_gradients_are_finite_despite_masked_scores() -> None:
    q, p = Q.clone().requires_grad_(), P.clone().requires_grad_()
    out = contrastive_loss(q, p, POSITIVE, OWNER, TAU, in_batch_negatives=False)
    out.loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    assert q.grad.abs().sum() > 0


# --- collate ------------------------------------------------------------------------------------


def test_pad_tokens_pads_right_with_a_mask() -> None:
    part = pad_tokens([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert part.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert part.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert part.padding_side == "right"


def test_pad_tokens_pads_left_when_asked() -> None:
    part = pad_tokens([np.array([5, 6, 7]), np.array([8])], pad_id=0, padding_side="left")
    assert part.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert part.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_tokens([np.array([5])], pad_id=0, padding_side="middle")


@pytest.mark.parametrize("side", ["right", "left"])
def test_chunks_trim_padding_columns_never_real_tokens(side: str) -> None:
    """A chunk of short texts is narrower than its batch: the cut falls on the padded side."""
    sequences = [np.array([5, 6, 7, 8, 9]), np.array([1, 2]), np.array([3])]
    part = pad_tokens(sequences, pad_id=0, padding_side=side)
    chunks = list(part.chunks(2))
    assert [(rows.start, chunk.width) for rows, chunk in chunks] == [(0, 5), (2, 1)]
    last = chunks[-1][1]
    assert last.input_ids.tolist() == [[3]] and last.attention_mask.tolist() == [[1]]
    assert last.padding_side == side
    rounded = list(part.chunks(2, multiple=4))[-1][1]
    assert rounded.width == 4 and rounded.attention_mask.sum() == 1
    real = rounded.input_ids[rounded.attention_mask.bool()]
    assert real.tolist() == [3]


@pytest.mark.parametrize(
    ("longest", "multiple", "cap", "width"),
    [
        (37, 1, None, 37),
        (37, 8, None, 40),
        (40, 8, None, 40),
        (37, 64, 256, 64),
        (250, 64, 256, 256),
        (250, 64, 252, 252),  # never past the max length...
        (253, 64, 252, 253),  # ...nor below the longest text
        (0, 8, None, 8),
    ],
)
def test_padded_width_rounds_up_to_the_multiple_within_the_max_length(
    longest: int, multiple: int, cap: int | None, width: int
) -> None:
    assert padded_width(longest, multiple, cap) == width


def test_pad_tokens_to_a_multiple_adds_masked_padding() -> None:
    part = pad_tokens([np.array([5, 6, 7]), np.array([8])], pad_id=0, multiple=4)
    ids, mask = part.input_ids, part.attention_mask
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_collate_lays_out_groups_and_marks_false_negatives() -> None:
    # Passage 1 is row 0's negative but row 1's positive; passage 0 (row 0's positive) also
    # shows up in row 1's group as a negative.
    rows = [
        TrainRow(query=0, pos=np.array([0]), neg=np.array([1, 2])),
        TrainRow(query=1, pos=np.array([1, 3]), neg=np.array([0])),
    ]
    groups = [Group(row=0, query=0, passages=[0, 1, 2]), Group(row=1, query=1, passages=[3, 0])]
    query_tokens = TokenTable.from_lists([[101, 11, 102], [101, 12, 13, 102]])
    passage_tokens = TokenTable.from_lists(
        [[101, 20, 102], [101, 21, 21, 102], [101, 102], [101, 23, 102]]
    )
    batch = collate(groups, rows, query_tokens, passage_tokens, pad_id=0)

    assert batch.layout.positive_index.tolist() == [0, 3]
    assert batch.layout.passage_owner.tolist() == [0, 0, 0, 1, 1]
    assert batch.layout.false_negative_mask.tolist() == [
        [False, False, False, False, True],  # the second copy of passage 0
        [False, True, False, False, False],  # passage 1, row 1's other positive
    ]
    assert batch.rows == [0, 1]
    wide = collate(groups, rows, query_tokens, passage_tokens, 0, 8, (6, 64))
    assert wide.parts["queries"].input_ids.shape[1] == 6  # 4 rounded to 8, capped at the query max
    assert wide.parts["passages"].input_ids.shape[1] == 8
    assert torch.equal(
        wide.parts["passages"].attention_mask[:, :4], batch.parts["passages"].attention_mask
    )
    assert wide.parts["passages"].attention_mask[:, 4:].sum() == 0
    assert batch.parts["queries"].input_ids.tolist() == [[101, 11, 102, 0], [101, 12, 13, 102]]
    assert batch.parts["queries"].attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.parts["passages"].input_ids.tolist() == [
        [101, 20, 102, 0],
        [101, 21, 21, 102],
        [101, 102, 0, 0],
        [101, 23, 102, 0],
        [101, 20, 102, 0],
    ]
    assert batch.parts["passages"].attention_mask.sum(1).tolist() == [3, 4, 2, 3, 3]
    assert batch.num_texts == 7
    assert batch.to(torch.device("cpu")).layout.positive_index.tolist() == [0, 3]

    # The layout feeds the loss directly: each query loses exactly its one false negative.
    emb_q, emb_p = torch.randn(2, 8), torch.randn(5, 8)
    out = contrastive_loss(
        emb_q,
        emb_p,
        batch.layout.positive_index,
        batch.layout.passage_owner,
        0.05,
        false_negative_mask=batch.layout.false_negative_mask,
    )
    assert out.candidates.tolist() == [4, 4]


def test_batch_signals_by_hand() -> None:
    from embtune.objectives.infonce import batch_signals, window_signals

    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 3] = True  # passage 3 is also a positive of query 0
    out = contrastive_loss(Q, P, POSITIVE, OWNER, TAU, false_negative_mask=mask)
    sums = batch_signals(out, POSITIVE, TAU)
    # Similarities q.p = SCORES * TAU. Query 0: positive 0 (1.0), hard negative 1 (0.5),
    # in-batch negative 2 (0.0), passage 3 masked. Query 1: positive 2 (1.0), hard negative 3
    # (1.0), in-batch negatives 0 (0.0) and 1 (0.5).
    assert sums["queries"] == 2
    assert sums["correct"] == 1  # query 1's hard negative ties its positive: not ranked first
    assert sums["positive_similarity"] == 2.0
    assert sums["hard_negatives"] == 2 and sums["hard_negative_similarity"] == 1.5
    assert sums["in_batch_negatives"] == 3 and sums["in_batch_negative_similarity"] == 0.5
    assert sums["candidates"] == 7 and sums["masked_false_negatives"] == 1
    means = window_signals(sums)
    assert means["accuracy"] == 0.5
    assert means["hard_negative_similarity"] == 0.75
    assert means["in_batch_negatives_per_query"] == 1.5
    assert means["candidates_per_query"] == 3.5


def test_the_layout_carries_teacher_scores_in_passage_order() -> None:
    rows = [
        TrainRow(query=0, pos=np.array([0]), neg=np.array([1, 2])),
        TrainRow(query=1, pos=np.array([3]), neg=np.array([4])),
    ]
    tokens = TokenTable.from_lists([[101, 102]] * 5)
    scored = Group(row=0, query=0, passages=[0, 2, 1], scores=[0.9, 0.1, float("nan")])
    plain = Group(row=1, query=1, passages=[3, 4])
    layout = collate([scored, plain], rows, tokens, tokens, pad_id=0).layout
    assert layout.teacher_scores.dtype == torch.float32
    values = layout.teacher_scores.tolist()
    assert values[:2] == pytest.approx([0.9, 0.1])
    assert all(math.isnan(v) for v in values[2:])  # the corpus-filled passage, the unscored row
    assert collate([plain], rows, tokens, tokens, pad_id=0).layout.teacher_scores is None
