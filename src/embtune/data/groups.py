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

When a row has more negatives than a group takes, ``negative_sampling`` decides which ones:

* ``random``: a fresh draw without replacement every epoch, independent across epochs
  (FlagEmbedding's behaviour); some negatives may never be drawn at all,
* ``cycle``: the row walks a seeded shuffle of its negatives, ``G - 1`` per epoch, so every
  negative is used once before any is used again (all of them within ``ceil(n / (G - 1))``
  epochs).

:class:`NegativeCoverage` counts which negatives a run actually showed, and
:func:`negatives_budget` predicts it before training (with the warnings in
:meth:`NegativesBudget.findings`).

Every draw comes from a generator seeded by (seed, epoch, row), so the same seed gives the same
groups whatever the batch size, process count or the point a run resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embtune.choices import NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES
from embtune.data.formats import Record
from embtune.data.store import TextStore
from embtune.models.instruction_format import instruction_prefix


@dataclass
class TrainRow:
    """A training row with texts replaced by text-store ids."""

    query: int  # id in the query store
    pos: np.ndarray  # ids in the passage store
    neg: np.ndarray
    source: str = ""
    # Teacher scores (knowledge distillation), one per id of ``pos`` / ``neg``; None without.
    pos_scores: np.ndarray | None = None
    neg_scores: np.ndarray | None = None

    @property
    def has_scores(self) -> bool:
        """True when the data gave teacher scores for this row's positives or negatives."""
        return self.pos_scores is not None or self.neg_scores is not None


@dataclass
class Group:
    """One query's passages for one step; ``passages[0]`` is the positive."""

    row: int
    query: int
    passages: list[int]
    filled: int = 0  # negatives added by the fill policy
    duplicates: int = 0  # negatives that repeat one already in the group
    # Teacher scores aligned with ``passages``, NaN where the data has none (corpus fill); None
    # when the row has no scores at all.
    scores: list[float] | None = None


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
    prompt_format: str = "{}{}",
    row_prompts: bool = True,
) -> TrainingTexts:
    """Put every distinct text in a store once and turn records into id rows.

    With ``row_prompts`` a row's ``prompt`` replaces the query instruction (FlagEmbedding's
    per-row prompt), put in ``prompt_format`` as the instruction is
    (models/instruction_format.py); without, rows' prompts are ignored.
    ``corpus`` adds extra passages (e.g. a BEIR corpus) that the ``corpus`` fill can draw from.
    A row's ``pos`` and ``neg`` come out sorted and distinct, with no negative that is also a
    positive; teacher scores (``pos_scores`` / ``neg_scores``) follow the ids they belong to.
    """
    queries, passages = TextStore(), TextStore()
    rows = []
    for rec in records:
        instruction = (
            instruction_prefix(prompt_format, rec.prompt) or ""
            if rec.prompt is not None and row_prompts
            else query_instruction
        )
        q = queries.add(instruction + rec.query)
        pos = np.array([passages.add(passage_instruction + t) for t in rec.pos], dtype=np.int64)
        neg = np.array([passages.add(passage_instruction + t) for t in rec.neg], dtype=np.int64)
        pos_scores = _scores_array(rec.pos_scores)
        neg_scores = _scores_array(rec.neg_scores)
        # A text listed as both positive and negative would train the model against itself.
        keep = ~np.isin(neg, pos)
        neg = neg[keep]
        neg_scores = neg_scores[keep] if neg_scores is not None else None
        pos, pos_scores = _distinct(pos, pos_scores)
        neg, neg_scores = _distinct(neg, neg_scores)
        rows.append(
            TrainRow(
                query=q,
                pos=pos,
                neg=neg,
                source=rec.source,
                pos_scores=pos_scores,
                neg_scores=neg_scores,
            )
        )
    for text in corpus or ():
        passages.add(passage_instruction + text)
    return TrainingTexts(queries=queries, passages=passages, rows=rows)


def _scores_array(scores: list[float] | None) -> np.ndarray | None:
    return None if scores is None else np.asarray(scores, dtype=np.float64)


def _distinct(ids: np.ndarray, scores: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.unique(ids)`` and the scores that stay aligned with it.

    A text listed twice (the same id) may carry two different teacher scores; there is no right
    one to pick, so the first occurrence's score is kept (``return_index`` gives first
    occurrences).
    """
    if scores is None:
        return np.unique(ids), None
    unique, first = np.unique(ids, return_index=True)
    return unique, scores[first]


_CYCLE_SALT = 0xC7C1E  # keeps cycle's generators apart from the per-(epoch, row) ones


class GroupSampler:
    """Seeded, stateless sampling of groups and batch order."""

    def __init__(
        self,
        rows: list[TrainRow],
        train_group_size: int,
        negative_fill: str,
        passage_count: int,
        seed: int,
        *,
        negative_sampling: str = "random",
    ) -> None:
        if negative_fill not in NEGATIVE_FILL_POLICIES:
            raise ValueError(f"unknown negative_fill {negative_fill!r}")
        if negative_sampling not in NEGATIVE_SAMPLING_POLICIES:
            raise ValueError(f"unknown negative_sampling {negative_sampling!r}")
        self.rows = rows
        self.group_size = train_group_size
        self.fill = negative_fill
        self.sampling = negative_sampling
        self.passage_count = passage_count
        self.seed = seed

    @property
    def negatives_needed(self) -> int:
        """Negatives per group: ``train_group_size - 1``."""
        return self.group_size - 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order rows are visited in an epoch (a seeded permutation)."""
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.rows))

    def state_dict(self) -> dict:
        """What a checkpoint stores to continue sampling exactly where a run stopped.

        Every draw is a function of (seed, epoch, row) and the batch order of (seed, epoch), for
        ``cycle`` too (its position in a row's shuffle follows from the epoch), so the step
        number alone gives the data position: this holds only the settings a resumed run must
        share.
        """
        return {
            "seed": self.seed,
            "train_group_size": self.group_size,
            "negative_fill": self.fill,
            "negative_sampling": self.sampling,
            "rows": len(self.rows),
            "passages": self.passage_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state_dict`; ValueError when it is another setup."""
        # Checkpoints written before the policy existed sampled at random.
        state = {"negative_sampling": "random", **state}
        mine = self.state_dict()
        differ = [f"{k} {state[k]!r} != {v!r}" for k, v in mine.items() if state.get(k, v) != v]
        if differ:
            raise ValueError(f"sampler state is for another setup: {', '.join(differ)}")

    def group(self, row_index: int, epoch: int) -> Group:
        """The group of row ``row_index`` in ``epoch``, with its teacher scores when it has any.

        The draws pick positions in ``row.pos`` / ``row.neg`` rather than ids: numpy draws the
        same numbers for ``choice(n)`` / ``permutation(n)`` as for ``choice(array)`` /
        ``permutation(array)`` of length n, so the groups are those of the id-drawing sampler,
        and the positions give the scores without a lookup.
        """
        row = self.rows[row_index]
        rng = np.random.default_rng([self.seed, epoch, row_index])
        positive = int(rng.integers(len(row.pos)))
        own, repeats = self._row_negatives(row_index, epoch, rng)
        picked = np.concatenate([own, repeats])
        passages = [int(row.pos[positive]), *row.neg[picked].tolist()]
        missing = self.negatives_needed - len(picked)
        extra: list[int] = []
        if missing > 0 and self.fill != "shrink":
            extra = self._corpus_fill(
                rng, exclude={*row.pos.tolist(), *passages[1:]}, count=missing
            )
        return Group(
            row_index,
            row.query,
            [*passages, *extra],
            filled=len(repeats) + len(extra),
            duplicates=len(repeats),
            scores=_group_scores(row, positive, picked, len(extra)) if row.has_scores else None,
        )

    def _row_negatives(
        self, row_index: int, epoch: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``row.neg`` of the group's own negatives, and of the repeat fill's.

        A row short of negatives gets all of them (shuffled); ``repeat`` then draws the missing
        ones again with replacement. Any slot still empty is the caller's corpus fill (or, with
        ``shrink``, stays empty).
        """
        none = np.zeros(0, dtype=np.int64)
        need, have = self.negatives_needed, len(self.rows[row_index].neg)
        if self.sampling == "cycle" and have > need > 0:
            return self._cycle_negatives(row_index, epoch), none
        if have >= need:
            return (rng.choice(have, size=need, replace=False) if need else none), none
        order = rng.permutation(have)
        if self.fill == "repeat" and have:
            return order, rng.choice(have, size=need - have, replace=True)
        return order, none

    def _cycle_negatives(self, row_index: int, epoch: int) -> np.ndarray:
        """Positions in ``row.neg`` of epoch ``epoch``'s slice of the row's walk (n > k > 0).

        The walk goes in passes of L = ceil(n / k) epochs. Each pass shuffles the row's
        negatives afresh (seeded by seed, pass and row, so no state is carried between epochs)
        and epoch j of the pass takes positions [j*k, j*k + k). The pass's last epoch has only
        r = n - (L-1)*k left; it tops up with the first k - r of the same shuffle, the ones
        shown longest ago. They cannot collide with the r left (k - r <= (L-1)*k since L >= 2),
        so a group never holds a duplicate, and every negative is shown once per pass.
        """
        n = len(self.rows[row_index].neg)
        k = self.negatives_needed
        per_pass = -(-n // k)
        pass_index, j = divmod(epoch, per_pass)
        order = np.random.default_rng([self.seed, pass_index, row_index, _CYCLE_SALT]).permutation(
            n
        )
        picked = order[j * k : j * k + k]
        if len(picked) < k:
            picked = np.concatenate([picked, order[: k - len(picked)]])
        return picked

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


def _group_scores(row: TrainRow, positive: int, negatives: np.ndarray, filled: int) -> list[float]:
    """Teacher scores of a group: the positive's, the picked negatives', NaN for corpus fill.

    ``positive`` and ``negatives`` are positions in ``row.pos`` / ``row.neg``. A row with scores
    for one side only gets NaN for the other.
    """
    pos = row.pos_scores[positive] if row.pos_scores is not None else np.nan
    if row.neg_scores is not None:
        neg = row.neg_scores[negatives].tolist()
    else:
        neg = [np.nan] * len(negatives)
    return [float(pos), *neg, *[np.nan] * filled]


# --- coverage: which of the data's negatives a run showed --------------------------------------


class NegativeCoverage:
    """Which of each row's own negatives the trained groups used, counted once per (row, text).

    Only a row's own (distinct) negatives count: passages added by the ``corpus`` fill are not
    the row's negatives and are ignored; ``repeat`` duplicates count once. With no negatives in
    the data, :attr:`fraction` is 1.0: nothing was left unseen (the budget's findings already
    say that the rows have none).

    Example::

        coverage = NegativeCoverage(sampler.rows)
        for row in batch_rows:
            coverage.add(sampler.group(int(row), epoch))
        print(f"{coverage.fraction:.0%} of the negatives were used")
    """

    def __init__(self, rows: list[TrainRow]) -> None:
        own = [np.unique(r.neg) for r in rows]  # sorted, so add() can search them
        self._offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in own], out=self._offsets[1:])
        self._negatives = np.concatenate(own) if own else np.zeros(0, dtype=np.int64)
        self._seen = np.zeros(len(self._negatives), dtype=bool)

    def add(self, group: Group) -> None:
        """Mark the row's negatives that ``group`` used (``passages[1:]``)."""
        start, end = self._offsets[group.row], self._offsets[group.row + 1]
        if start == end or len(group.passages) < 2:
            return
        own = self._negatives[start:end]
        ids = np.asarray(group.passages[1:], dtype=own.dtype)
        at = np.minimum(np.searchsorted(own, ids), len(own) - 1)
        self._seen[start + at[own[at] == ids]] = True

    @property
    def used(self) -> int:
        """Distinct (row, negative) pairs shown at least once."""
        return int(self._seen.sum())

    @property
    def total(self) -> int:
        """Distinct (row, negative) pairs in the data."""
        return len(self._seen)

    @property
    def fraction(self) -> float:
        """``used / total``; 1.0 when the data has no negatives (nothing was left unseen)."""
        return self.used / self.total if self.total else 1.0


# --- the negatives budget ----------------------------------------------------------------------

UNSEEN_WARNING = 0.5  # findings: share of negatives never shown above which a run wastes data
FILL_WARNING = 0.05  # findings: share of rows completed with corpus passages worth a mention


def expected_unseen(n: int, k: int, epochs: float, sampling: str) -> float:
    """Expected share of one row's ``n`` distinct negatives never shown over ``epochs``.

    ``k`` negatives per group; ``epochs = e + f`` with ``e`` whole epochs and a last, unfinished
    one in which the row is visited with probability ``f`` (its share of rows visited).

    * ``random`` draws k of n without replacement each epoch, independently, so a negative is
      missed by one epoch with probability ``q = 1 - k/n`` (``q = 0`` when ``n <= k``: every
      negative is in every group) and by the partial epoch with ``(1 - f) + f*q``:
      ``P(unseen) = q**e * (1 - f*k/n)``, i.e. ``(1 - k/n)**E`` for whole ``E``.
    * ``cycle`` shows ``min(n, e*k)`` distinct negatives after ``e`` epochs, so
      ``P(unseen) = ((1 - f) * max(0, n - e*k) + f * max(0, n - (e+1)*k)) / n``.
    """
    if n <= 0:
        return 0.0
    whole = int(np.floor(epochs))
    part = epochs - whole
    if sampling == "cycle":
        left = (1 - part) * max(0, n - whole * k) + part * max(0, n - (whole + 1) * k)
        return left / n
    miss = max(0.0, 1 - k / n)
    return miss**whole * (1 - part * (1 - miss))


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
    train_group_size: int = 0
    batch_size: int = 0  # per process
    world_size: int = 1
    in_batch_negatives: bool = True
    cross_device: bool = False
    own_group: int = 0  # passages of the query's own group (typical, for shrink)
    in_batch_candidates: int = 0  # passages of the other queries it is scored against
    epochs: float = 1.0
    sampling: str = "random"
    negatives_total: int = 0  # distinct (row, negative) pairs
    unseen_negative_fraction: float = 0.0
    rows_without_negatives: int = 0
    rows_with_duplicate_fill: int = 0  # groups padded with repeats of the row's own negatives
    filled_slot_fraction: float = 0.0  # share of negative slots the fill policy supplies
    epochs_to_see_all: int = 0  # with cycle: every row's negatives shown at least once
    unseen_after_one_epoch: float = 0.0  # tells a short run apart from a small group

    def _epochs_text(self) -> str:
        shown = f"{round(self.epochs, 3):g}"
        return f"{shown} epoch" + ("" if shown == "1" else "s")

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
        if self.negatives_total:
            out.append(
                f"negatives never shown over {self._epochs_text()}: "
                f"{self.unseen_negative_fraction:.0%} expected (--negative-sampling "
                f"{self.sampling})"
            )
        return out

    def findings(self) -> list[str]:
        """Warnings about the setup, each in plain language with the fix; [] when all is well."""
        out: list[str] = []
        k, size = self.negatives_used_per_step, self.train_group_size
        short_run = self.epochs < 1 and self.unseen_after_one_epoch <= UNSEEN_WARNING
        if self.negatives_total and self.unseen_negative_fraction > UNSEEN_WARNING and short_run:
            out.append(
                f"the run stops after {self._epochs_text()}, so {1 - self.epochs:.0%} of the rows "
                f"are never visited and {self.unseen_negative_fraction:.0%} of negatives never "
                "seen. Train at least 1 epoch (raise or drop --max-steps)."
            )
        elif self.negatives_total and self.unseen_negative_fraction > UNSEEN_WARNING:
            if self.negatives_min == self.negatives_max:
                have = f"every query has {self.negatives_max} negatives"
            else:
                have = (
                    f"queries have {self.negatives_min} to {self.negatives_max} negatives "
                    f"(median {self.negatives_median:g})"
                )
            unseen = (
                f"{have} but train_group_size={size} uses {k} per step: over "
                f"{self._epochs_text()} {self.unseen_negative_fraction:.0%} of negatives are "
                "never seen."
            )
            if k == 0:
                fix = "Raise --train-group-size: 1 is the positive alone."
            elif self.sampling == "cycle":
                fix = (
                    "Raise --train-group-size (memory grows linearly) or train "
                    f"{self.epochs_to_see_all} epochs (cycle then shows every negative)."
                )
            else:
                fix = (
                    "Raise --train-group-size (memory grows linearly), train more epochs, or use "
                    f"--negative-sampling cycle (every negative within {self.epochs_to_see_all} "
                    "epochs)."
                )
            out.append(f"{unseen} {fix}")
        short = self.rows_needing_fill - self.rows_without_negatives  # 0 < n < k
        if self.rows_with_duplicate_fill:
            out.append(
                f"{self.rows_with_duplicate_fill} of {self.rows} rows have fewer than {k} "
                "negatives and --negative-fill repeat pads their groups with duplicates: a "
                "repeated negative adds nothing new and weighs twice in the loss. Use "
                "--negative-fill corpus or shrink, lower --train-group-size, or mine more "
                "negatives (embtune mine)."
            )
        elif short and self.fill_policy != "repeat" and short > FILL_WARNING * self.rows:
            effect = {
                "corpus": "their groups are completed with random corpus passages (easy "
                f"negatives; {self.filled_slot_fraction:.0%} of all negative slots)",
                "shrink": "their groups shrink, so they see fewer candidates",
            }[self.fill_policy]
            out.append(
                f"{short} of {self.rows} rows have fewer than {k} negatives: {effect}. Lower "
                "--train-group-size or mine more negatives (embtune mine)."
            )
        if self.rows_without_negatives:
            if self.fill_policy != "shrink":
                effect = "every negative in their groups is a random corpus passage"
            elif self.in_batch_negatives:
                effect = "they learn from in-batch negatives only"
            else:
                effect = "their loss is always 0, so they train nothing"
            out.append(
                f"{self.rows_without_negatives} of {self.rows} rows have no negatives: {effect}. "
                "Mine hard negatives for them (embtune mine)."
            )
        if self.cross_device and not self.in_batch_negatives:
            out.append(
                "--negatives-cross-device does nothing with --no-in-batch-negatives: other "
                "processes' passages are in-batch negatives. Drop one of the two."
            )
        elif self.cross_device and self.world_size == 1:
            out.append(
                "--negatives-cross-device does nothing with 1 process. Launch several "
                "(torchrun --nproc_per_node N -m embtune train ...) or drop the option."
            )
        return out

    def to_json(self) -> dict:
        """The budget as JSON (``negatives_budget.json``, ``embtune inspect --json``)."""
        return {
            "rows": self.rows,
            "negatives_per_query": {
                "min": self.negatives_min,
                "median": self.negatives_median,
                "max": self.negatives_max,
            },
            "negatives_total": self.negatives_total,
            "negatives_used_per_step": self.negatives_used_per_step,
            "train_group_size": self.train_group_size,
            "candidates_per_query": self.candidates_per_query,
            "candidates": {"own_group": self.own_group, "in_batch": self.in_batch_candidates},
            "chance_loss": self.chance_loss,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "in_batch_negatives": self.in_batch_negatives,
            "cross_device": self.cross_device,
            "epochs": self.epochs,
            "sampling": self.sampling,
            "unseen_negative_fraction": self.unseen_negative_fraction,
            "epochs_to_see_all": self.epochs_to_see_all,
            "unseen_after_one_epoch": self.unseen_after_one_epoch,
            "fill_policy": self.fill_policy,
            "rows_needing_fill": self.rows_needing_fill,
            "rows_without_negatives": self.rows_without_negatives,
            "rows_with_duplicate_fill": self.rows_with_duplicate_fill,
            "filled_slot_fraction": self.filled_slot_fraction,
            "findings": self.findings(),
        }


def negatives_budget(
    rows: list[TrainRow],
    train_group_size: int,
    batch_size: int,
    in_batch_negatives: bool,
    fill: str,
    *,
    epochs: float = 1.0,
    sampling: str = "random",
    world_size: int = 1,
    cross_device: bool = False,
) -> NegativesBudget:
    """The negatives budget of a training setup, for a full step.

    ``batch_size`` is per process. A query is scored against its own group (G passages; with
    ``shrink``, 1 + the median row's negatives, at most G - 1) and, with in-batch negatives, the
    groups of the other queries of its process's batch, or of the global batch (``world_size``
    x ``batch_size`` queries) with ``cross_device``; batches are capped at the row count.
    ``epochs`` may be fractional (:func:`embtune.data.epoch_plan.epochs_of_run`); the unseen
    share is :func:`expected_unseen` summed over every row's distinct negatives.
    """
    # build_rows leaves each row's negatives distinct, so a length is a count of distinct texts.
    counts = np.array([len(r.neg) for r in rows]) if rows else np.zeros(1, dtype=int)
    need = train_group_size - 1
    median = float(np.median(counts))
    own = 1 + min(need, int(median)) if fill == "shrink" else train_group_size
    queries = batch_size * world_size if cross_device else batch_size
    batch = min(queries, max(len(rows), 1))
    in_batch = (batch - 1) * own if in_batch_negatives else 0
    candidates = own + in_batch
    total = int(counts.sum()) if rows else 0
    sizes, how_many = np.unique(counts, return_counts=True)  # few sizes, however many rows

    def unseen_over(planned: float) -> float:
        missed = sum(
            int(m) * int(n) * expected_unseen(int(n), need, planned, sampling)
            for n, m in zip(sizes, how_many, strict=True)
        )
        return missed / total if total else 0.0

    short = counts < need
    return NegativesBudget(
        rows=len(rows),
        negatives_min=int(counts.min()),
        negatives_median=median,
        negatives_max=int(counts.max()),
        negatives_used_per_step=need,
        candidates_per_query=candidates,
        rows_needing_fill=int(short.sum()) if rows else 0,
        fill_policy=fill,
        chance_loss=float(np.log(max(candidates, 1))),
        train_group_size=train_group_size,
        batch_size=batch_size,
        world_size=world_size,
        in_batch_negatives=in_batch_negatives,
        cross_device=cross_device,
        own_group=own,
        in_batch_candidates=in_batch,
        epochs=float(epochs),
        sampling=sampling,
        negatives_total=total,
        unseen_negative_fraction=unseen_over(epochs),
        rows_without_negatives=int((counts == 0).sum()) if rows else 0,
        rows_with_duplicate_fill=int((short & (counts > 0)).sum()) if fill == "repeat" else 0,
        filled_slot_fraction=(
            float(np.maximum(need - counts, 0).sum() / (len(rows) * need))
            if rows and need and fill != "shrink"
            else 0.0
        ),
        epochs_to_see_all=-(-int(counts.max()) // need) if need else 0,
        unseen_after_one_epoch=unseen_over(1.0),
    )
