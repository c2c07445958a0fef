"""Group sampler: which positive and which negatives each query trains on at each step.

The semantics are FlagEmbedding's ``train_group_size`` (users know them): per query, per epoch,
one group = 1 positive (chosen at random among the row's ``pos``) + ``train_group_size - 1``
negatives, drawn without replacement when the row has enough. Negatives beyond that are not
used in that epoch. When a row has too few negatives, the ``negative_fill`` policy decides:

* ``corpus``: the row's negatives, then random passages from the whole text store (never the
  row's positives, never a duplicate),
* ``repeat``: the row's negatives resampled with duplicates (FlagEmbedding's behaviour); a row
  with no negatives at all cannot repeat anything and is filled from the corpus instead,
* ``shrink``: just the negatives the row has; the loss handles the smaller group.

Every draw comes from a generator seeded by (seed, epoch, row), so the same seed gives the same
groups whatever the batch size, process count or the point a run resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embtune.data.formats import Record
from embtune.data.store import TextStore


@dataclass
class TrainRow:
    """A training row with texts replaced by text-store ids."""

    query: int  # id in the query store
    pos: np.ndarray  # ids in the passage store
    neg: np.ndarray
    source: str = ""


@dataclass
class Group:
    """One query's passages for one step; ``passages[0]`` is the positive."""

    row: int
    query: int
    passages: list[int]
    filled: int = 0  # negatives added by the fill policy
    duplicates: int = 0  # negatives that repeat one already in the group


@dataclass
class TrainingTexts:
    """Stores and rows built from validated records."""

    queries: TextStore
    passages: TextStore
    rows: list[TrainRow] = field(default_factory=list)


def build_rows(
    records: list[Record],
    query_instruction: str = "",
    passage_instruction: str = "",
    corpus: list[str] | None = None,
) -> TrainingTexts:
    """Put every distinct text in a store once and turn records into id rows.

    A row's ``prompt`` replaces the query instruction (FlagEmbedding's per-row prompt).
    ``corpus`` adds extra passages (e.g. a BEIR corpus) that the ``corpus`` fill can draw from.
    """
    queries, passages = TextStore(), TextStore()
    rows = []
    for rec in records:
        instruction = rec.prompt if rec.prompt is not None else query_instruction
        q = queries.add(instruction + rec.query)
        pos = np.array([passages.add(passage_instruction + t) for t in rec.pos], dtype=np.int64)
        neg = np.array([passages.add(passage_instruction + t) for t in rec.neg], dtype=np.int64)
        # A text listed as both positive and negative would train the model against itself.
        neg = neg[~np.isin(neg, pos)]
        rows.append(TrainRow(query=q, pos=np.unique(pos), neg=np.unique(neg), source=rec.source))
    for text in corpus or ():
        passages.add(passage_instruction + text)
    return TrainingTexts(queries=queries, passages=passages, rows=rows)


class GroupSampler:
    """Seeded, stateless sampling of groups and batch order."""

    def __init__(
        self,
        rows: list[TrainRow],
        train_group_size: int,
        negative_fill: str,
        passage_count: int,
        seed: int,
    ) -> None:
        if negative_fill not in ("corpus", "repeat", "shrink"):
            raise ValueError(f"unknown negative_fill {negative_fill!r}")
        self.rows = rows
        self.group_size = train_group_size
        self.fill = negative_fill
        self.passage_count = passage_count
        self.seed = seed

    @property
    def negatives_needed(self) -> int:
        return self.group_size - 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order rows are visited in an epoch (a seeded permutation)."""
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.rows))

    def batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Row indices of each step of an epoch; the last batch may be smaller."""
        order = self.epoch_order(epoch)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def state_dict(self) -> dict:
        """What a checkpoint stores to continue sampling exactly where a run stopped.

        Today every draw is a function of (seed, epoch, row) and the batch order of (seed,
        epoch), so the step number alone gives the data position: this holds only the settings
        a resumed run must share. Samplers with memory across steps (e.g. cycling through a row's
        negatives) add their state here.
        """
        return {
            "seed": self.seed,
            "train_group_size": self.group_size,
            "negative_fill": self.fill,
            "rows": len(self.rows),
            "passages": self.passage_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state_dict`; ValueError when it is another setup."""
        mine = self.state_dict()
        differ = [f"{k} {state[k]!r} != {v!r}" for k, v in mine.items() if state.get(k, v) != v]
        if differ:
            raise ValueError(f"sampler state is for another setup: {', '.join(differ)}")

    def group(self, row_index: int, epoch: int) -> Group:
        """The group of row ``row_index`` in ``epoch``."""
        row = self.rows[row_index]
        rng = np.random.default_rng([self.seed, epoch, row_index])
        positive = int(row.pos[rng.integers(len(row.pos))])
        need = self.negatives_needed
        have = len(row.neg)
        if have >= need:
            negatives = rng.choice(row.neg, size=need, replace=False).tolist() if need else []
            return Group(row_index, row.query, [positive, *negatives])
        negatives = rng.permutation(row.neg).tolist()
        missing = need - have
        if self.fill == "shrink":
            return Group(row_index, row.query, [positive, *negatives])
        if self.fill == "repeat" and have:
            extra = rng.choice(row.neg, size=missing, replace=True).tolist()
            return Group(row_index, row.query, [positive, *negatives, *extra], missing, missing)
        extra = self._corpus_fill(rng, exclude={*row.pos.tolist(), *negatives}, count=missing)
        return Group(row_index, row.query, [positive, *negatives, *extra], len(extra))

    def _corpus_fill(self, rng: np.random.Generator, exclude: set[int], count: int) -> list[int]:
        """Up to ``count`` distinct random passage ids outside ``exclude``."""
        available = self.passage_count - len(exclude)
        count = min(count, max(available, 0))
        picked: list[int] = []
        seen = set(exclude)
        # Rejection sampling: exclusions are a handful of ids in a large store, so this ends fast;
        # when the store is small we fall back to an explicit list of what is left.
        for _ in range(8):
            if len(picked) == count:
                break
            for pid in rng.integers(
                self.passage_count, size=2 * (count - len(picked)) + 4
            ).tolist():
                if pid not in seen:
                    seen.add(pid)
                    picked.append(pid)
                    if len(picked) == count:
                        break
        if len(picked) < count:
            rest = np.setdiff1d(np.arange(self.passage_count), np.fromiter(seen, dtype=np.int64))
            picked.extend(rng.choice(rest, size=count - len(picked), replace=False).tolist())
        return picked


@dataclass
class NegativesBudget:
    """What the group settings do with the data, in numbers (printed before training)."""

    rows: int
    negatives_min: int
    negatives_median: float
    negatives_max: int
    negatives_used_per_step: int
    candidates_per_query: int
    rows_needing_fill: int
    fill_policy: str
    chance_loss: float

    def lines(self) -> list[str]:
        """Plain-language summary, one fact per line."""
        out = [
            f"rows (queries): {self.rows}",
            f"negatives per query in the data: min {self.negatives_min}, median "
            f"{self.negatives_median:g}, max {self.negatives_max}",
            f"negatives used per query per step: {self.negatives_used_per_step} "
            f"(train_group_size - 1)",
            f"candidates each query is scored against: {self.candidates_per_query}",
            f"loss at chance level: ln({self.candidates_per_query}) = {self.chance_loss:.3f}",
        ]
        if self.rows_needing_fill:
            how = {
                "corpus": "filled with random corpus passages",
                "repeat": "filled by repeating their negatives (duplicates)",
                "shrink": "trained with smaller groups",
            }[self.fill_policy]
            out.append(
                f"rows with too few negatives: {self.rows_needing_fill} ({how}; --negative-fill)"
            )
        return out


def negatives_budget(
    rows: list[TrainRow],
    train_group_size: int,
    batch_size: int,
    in_batch_negatives: bool,
    fill: str,
) -> NegativesBudget:
    """The negatives budget of a training setup (full batches, one process)."""
    counts = np.array([len(r.neg) for r in rows]) if rows else np.zeros(1, dtype=int)
    need = train_group_size - 1
    batch = min(batch_size, max(len(rows), 1))
    candidates = batch * train_group_size if in_batch_negatives else train_group_size
    if fill == "shrink" and not in_batch_negatives:
        candidates = 1 + min(need, int(np.median(counts)))
    return NegativesBudget(
        rows=len(rows),
        negatives_min=int(counts.min()),
        negatives_median=float(np.median(counts)),
        negatives_max=int(counts.max()),
        negatives_used_per_step=need,
        candidates_per_query=candidates,
        rows_needing_fill=int((counts < need).sum()),
        fill_policy=fill,
        chance_loss=float(np.log(max(candidates, 1))),
    )
