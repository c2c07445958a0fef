"""Batches: padded token parts plus the group layout an objective reads.

A :class:`Batch` is what a step strategy encodes and an objective scores, without either
knowing the model kind: ``parts`` maps a part's name to its padded tokens, in the order they
are encoded (a bi-encoder has ``passages`` then ``queries``; a cross-encoder would have
``pairs``), and ``layout`` says how the encoded rows relate to the queries.

Passages of all groups are laid out one after another: query ``b``'s group occupies
``passages[offsets[b]:offsets[b+1]]`` with its positive first, so ``positive_index[b] =
offsets[b]``. Groups may differ in size (``negative_fill=shrink``).

Padding may be on either side (``TokenBatch.padding_side``): decoder models pad on the left so
that the last position holds the last real token. Everything that trims or pads a part goes
through :class:`TokenBatch`, so no code path cuts real tokens of a left-padded row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from embtune.choices import PADDING_SIDES
from embtune.data.groups import Group, TrainRow


def padded_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """The width a batch whose longest text has ``longest`` tokens is padded to.

    ``longest`` rounded up to a multiple of ``multiple``, but never past ``cap`` (the max
    length, which the position embeddings are sized for) nor below ``longest``.
    """
    width = max(longest, 1)
    rounded = -(-width // multiple) * multiple
    return max(width, min(rounded, cap)) if cap else rounded


@dataclass
class TokenBatch:
    """One part of a batch: padded token ids, their attention mask, and the padding side."""

    input_ids: torch.Tensor  # [N, width]
    attention_mask: torch.Tensor  # [N, width], 1 = real token
    padding_side: str = "right"
    # [N, width] segment of each token (a cross-encoder's pair: 0 = query, 1 = passage), or None
    token_type_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Texts in this part."""
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        """Padded width (token positions per text)."""
        return int(self.input_ids.shape[1])

    @property
    def padded_tokens(self) -> int:
        """Token positions the encoder computes, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device) -> TokenBatch:
        """The same part on ``device``."""
        types = self.token_type_ids
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            token_type_ids=types.to(device) if types is not None else None,
        )

    def chunks(self, size: int, multiple: int = 1) -> Iterator[tuple[slice, TokenBatch]]:
        """(rows, part) per chunk of ``size`` texts, without the padding columns no text of the
        chunk uses (a chunk of short texts is narrower than the batch), taken from the padded
        side; widths are rounded up to ``multiple`` as the batch's were."""
        lengths = self.attention_mask.sum(1).tolist()  # one device sync for all chunks
        for start in range(0, self.rows, size):
            rows = slice(start, start + size)
            width = padded_width(max(lengths[rows], default=1), multiple, self.width)
            columns = slice(0, width) if self.padding_side == "right" else slice(-width, None)
            types = self.token_type_ids
            yield (
                rows,
                TokenBatch(
                    self.input_ids[rows, columns],
                    self.attention_mask[rows, columns],
                    self.padding_side,
                    types[rows, columns] if types is not None else None,
                ),
            )


def pad_tokens(
    sequences: list[np.ndarray],
    pad_id: int,
    multiple: int = 1,
    cap: int | None = None,
    padding_side: str = "right",
    token_types: list[Sequence[int]] | None = None,
) -> TokenBatch:
    """Padded ids and attention mask for a list of id arrays (and their token types, padded
    with 0, when given).

    The width is the longest sequence's, rounded by :func:`padded_width`.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    width = padded_width(max((len(s) for s in sequences), default=1), multiple, cap)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    types = np.zeros((len(sequences), width), dtype=np.int64) if token_types else None
    for i, seq in enumerate(sequences):
        at = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        ids[i, at] = seq
        mask[i, at] = 1
        if types is not None:
            types[i, at] = token_types[i]
    return TokenBatch(
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        padding_side,
        torch.from_numpy(types) if types is not None else None,
    )


def false_negative_mask(passage_ids: np.ndarray, positive_ids: list[np.ndarray]) -> np.ndarray:
    """[B, P] True where passage ``p`` is one of query ``b``'s positives.

    Such a passage (another query's positive or negative can be the same text) must not be
    pushed away from ``b``: the loss masks it out of ``b``'s softmax.
    """
    mask = np.zeros((len(positive_ids), len(passage_ids)), dtype=bool)
    for b, positives in enumerate(positive_ids):
        mask[b] = np.isin(passage_ids, positives)
    return mask


@dataclass
class GroupLayout:
    """How a batch's passages belong to its queries (what an objective needs besides scores)."""

    positive_index: torch.Tensor  # [B] column of each query's positive among all passages
    passage_owner: torch.Tensor  # [P] which query's group each passage belongs to
    false_negative_mask: torch.Tensor  # [B, P] True where a passage is one of the query's positives
    passage_ids: torch.Tensor  # [P] text-store id of each passage (false negatives across devices)
    positive_ids: list[np.ndarray]  # [B] text-store ids of each query's positives
    # [B] the number passage_owner uses for each query: None = 0..B-1; with cross-device
    # negatives, the query's place in the global batch (embtune.distributed.gather_layout).
    query_index: torch.Tensor | None = None
    # [P] float32 teacher score of each passage (the rows' pos_scores / neg_scores), NaN where
    # the data has none (corpus fill, a row without scores); None when no group has scores.
    teacher_scores: torch.Tensor | None = None

    @property
    def queries(self) -> int:
        """Queries (groups) in the batch."""
        return int(self.positive_index.shape[0])

    def to(self, device: torch.device) -> GroupLayout:
        """The same layout with its tensors on ``device``."""
        moved = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()
        }
        return GroupLayout(**moved)


def own_group_mask(
    passage_owner: torch.Tensor, query_index: torch.Tensor | None, queries: int
) -> torch.Tensor:
    """[B, P] True where a passage belongs to the query's own group (``query_index``: the
    numbers ``passage_owner`` uses for the queries, default 0..B-1)."""
    number = query_index
    if number is None:
        number = torch.arange(queries, device=passage_owner.device)
    return passage_owner.unsqueeze(0) == number.unsqueeze(1)


def group_layout(groups: list[Group], rows: list[TrainRow]) -> GroupLayout:
    """The layout of ``groups`` laid out one after another, each with its positive first."""
    passage_ids = np.array([pid for g in groups for pid in g.passages], dtype=np.int64)
    sizes = [len(g.passages) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(groups)), sizes)
    positive_ids = [rows[g.row].pos for g in groups]
    false_neg = false_negative_mask(passage_ids, positive_ids)
    false_neg[np.arange(len(groups)), offsets] = False  # the query's own positive
    return GroupLayout(
        positive_index=torch.from_numpy(offsets),
        passage_owner=torch.from_numpy(owner),
        false_negative_mask=torch.from_numpy(false_neg),
        passage_ids=torch.from_numpy(passage_ids),
        positive_ids=positive_ids,
        teacher_scores=_teacher_scores(groups),
    )


def _teacher_scores(groups: list[Group]) -> torch.Tensor | None:
    """Every passage's teacher score in layout order; None when no group carries scores."""
    if all(g.scores is None for g in groups):
        return None
    scores = [
        score
        for g in groups
        for score in (g.scores if g.scores is not None else [math.nan] * len(g.passages))
    ]
    return torch.tensor(scores, dtype=torch.float32)


@dataclass
class Batch:
    """Everything one training step needs: padded parts, in encoding order, and the layout."""

    parts: dict[str, TokenBatch]
    layout: GroupLayout
    rows: list[int]  # training-row indices, for messages about a bad batch

    @property
    def num_texts(self) -> int:
        """Texts encoded by the step (every part)."""
        return sum(part.rows for part in self.parts.values())

    @property
    def padded_tokens(self) -> int:
        """Token positions encoded, padding included."""
        return sum(part.padded_tokens for part in self.parts.values())

    @property
    def real_tokens(self) -> int:
        """Real (non-padding) tokens encoded."""
        return int(sum(part.attention_mask.sum() for part in self.parts.values()))

    def to(self, device: torch.device) -> Batch:
        """The same batch with its tensors on ``device``."""
        parts = {name: part.to(device) for name, part in self.parts.items()}
        return Batch(parts, self.layout.to(device), self.rows)
