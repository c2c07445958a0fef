"""Collation: groups of text ids -> padded token tensors plus the layout the loss needs.

Passages of all groups are laid out one after another: query ``b``'s group occupies
``passages[offsets[b]:offsets[b+1]]`` with its positive first, so ``positive_index[b] =
offsets[b]``. Groups may differ in size (``negative_fill=shrink``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable


@dataclass
class Batch:
    """Everything one training step needs, as tensors."""

    query_input_ids: torch.Tensor
    query_attention_mask: torch.Tensor
    passage_input_ids: torch.Tensor
    passage_attention_mask: torch.Tensor
    positive_index: torch.Tensor  # [B] column of each query's positive among all passages
    passage_owner: torch.Tensor  # [P] which query's group each passage belongs to
    false_negative_mask: torch.Tensor  # [B, P] True where a passage is one of the query's positives
    rows: list[int]  # training-row indices, for messages about a bad batch
    passage_ids: torch.Tensor  # [P] text-store id of each passage (false negatives across devices)
    positive_ids: list[np.ndarray]  # [B] text-store ids of each query's positives

    @property
    def num_texts(self) -> int:
        return int(self.query_input_ids.shape[0] + self.passage_input_ids.shape[0])

    def to(self, device: torch.device) -> Batch:
        moved = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()
        }
        return Batch(**moved)


def padded_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """The width a batch whose longest text has ``longest`` tokens is padded to.

    ``longest`` rounded up to a multiple of ``multiple``, but never past ``cap`` (the max
    length, which the position embeddings are sized for) nor below ``longest``.
    """
    width = max(longest, 1)
    rounded = -(-width // multiple) * multiple
    return max(width, min(rounded, cap)) if cap else rounded


def pad_tokens(
    sequences: list[np.ndarray], pad_id: int, multiple: int = 1, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for a list of id arrays.

    The width is the longest sequence's, rounded by :func:`padded_width`.
    """
    width = padded_width(max((len(s) for s in sequences), default=1), multiple, cap)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def false_negative_mask(passage_ids: np.ndarray, positive_ids: list[np.ndarray]) -> np.ndarray:
    """[B, P] True where passage ``p`` is one of query ``b``'s positives.

    Such a passage (another query's positive or negative can be the same text) must not be
    pushed away from ``b``: the loss masks it out of ``b``'s softmax.
    """
    mask = np.zeros((len(positive_ids), len(passage_ids)), dtype=bool)
    for b, positives in enumerate(positive_ids):
        mask[b] = np.isin(passage_ids, positives)
    return mask


def collate(
    groups: list[Group],
    rows: list[TrainRow],
    query_tokens: TokenTable,
    passage_tokens: TokenTable,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    max_lengths: tuple[int, int] | None = None,
) -> Batch:
    """Build the tensors of one step from its groups.

    Widths are rounded up to ``pad_to_multiple_of``, at most ``max_lengths`` (query, passage).
    """
    query_cap, passage_cap = max_lengths or (None, None)
    passage_ids = [pid for g in groups for pid in g.passages]
    sizes = [len(g.passages) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(groups)), sizes)
    pid_array = np.array(passage_ids, dtype=np.int64)
    positive_ids = [rows[g.row].pos for g in groups]
    false_neg = false_negative_mask(pid_array, positive_ids)
    false_neg[np.arange(len(groups)), offsets] = False  # the query's own positive
    q_ids, q_mask = pad_tokens(
        [query_tokens[g.query] for g in groups], pad_id, pad_to_multiple_of, query_cap
    )
    p_ids, p_mask = pad_tokens(
        [passage_tokens[p] for p in passage_ids], pad_id, pad_to_multiple_of, passage_cap
    )
    return Batch(
        query_input_ids=q_ids,
        query_attention_mask=q_mask,
        passage_input_ids=p_ids,
        passage_attention_mask=p_mask,
        positive_index=torch.from_numpy(offsets),
        passage_owner=torch.from_numpy(owner),
        false_negative_mask=torch.from_numpy(false_neg),
        rows=[g.row for g in groups],
        passage_ids=torch.from_numpy(pid_array),
        positive_ids=positive_ids,
    )
