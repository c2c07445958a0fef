"""What the rows' teacher scores say before training: suspected false negatives, the negatives
``--drop-teacher-false-negatives`` removes, and rows distillation cannot use.

A row's teacher scores (``pos_scores`` / ``neg_scores``) cost nothing to check once they are
computed: a negative the teacher scores at or above one of the row's own positives is likely a
false negative (relevant but unlabelled) or a wrong label. Mining leaves such passages in;
ms-swift masks by the student's own similarity during training, which changes as the student
learns and is invisible in the data. Here the check is fixed, visible in ``embtune inspect``
and at train start, and removal is counted and saved with the run.

A row's comparison point is its *lowest* positive score: a negative that the teacher ranks as
high as a known relevant passage is as relevant as that one, by the teacher's account.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from embtune.data.formats import Record
from embtune.errors import UsageError, shorten

SHOWN = 5  # worst suspects listed by `inspect`, unscored rows named by a refusal


@dataclass
class SuspectNegative:
    """A negative the teacher scores at or above its row's lowest positive."""

    source: str  # file:line of the row
    query: str
    negative: str
    negative_score: float
    positive_score: float  # the row's lowest positive score

    @property
    def excess(self) -> float:
        """How far the negative's score is above the positive's."""
        return self.negative_score - self.positive_score


@dataclass
class TeacherCheck:
    """Suspected false negatives over the rows that have both positive and negative scores."""

    checked_rows: int
    checked_negatives: int
    suspects: int
    rows_with_suspects: int
    worst: list[SuspectNegative] = field(default_factory=list)  # largest excess first

    def lines(self) -> list[str]:
        """The check as plain text lines (a section of `embtune inspect`)."""
        out = [
            f"teacher scores: {self.checked_negatives:,} negatives of {self.checked_rows:,} rows "
            f"checked; {self.suspects:,} scored at or above the row's lowest positive "
            f"({self.rows_with_suspects:,} rows, {self.row_share:.1%})"
        ]
        if self.worst:
            out.append("  worst (negative - positive score: query | negative, row)")
            out += [
                f"  {s.excess:+8.3f}: {shorten(s.query, 40)} | {shorten(s.negative, 50)} "
                f"({s.source})"
                for s in self.worst
            ]
        return out

    @property
    def row_share(self) -> float:
        """Share of the checked rows with at least one suspect."""
        return self.rows_with_suspects / self.checked_rows if self.checked_rows else 0.0

    def findings(self) -> list[str]:
        """A warning with the fix when the teacher disagrees with some labels."""
        if not self.suspects:
            return []
        return [
            f"{self.suspects} negatives in {self.rows_with_suspects} rows "
            f"({self.row_share:.0%}) are scored by the teacher at or above the row's positive: "
            "likely false negatives or wrong labels. Look at the worst (`embtune inspect`), or "
            "remove them before sampling with --drop-teacher-false-negatives 0 (a margin M "
            "also removes those within M below the positive)."
        ]

    def to_json(self) -> dict:
        """Plain JSON (the "teacher_check" object of `embtune inspect --json`)."""
        data = asdict(self)
        data["row_share"] = self.row_share
        for shown, suspect in zip(data["worst"], self.worst, strict=True):
            shown["excess"] = suspect.excess
        return data


def _lowest_positive(record: Record) -> float | None:
    """The row's comparison score, or None when it cannot be checked."""
    if not record.pos_scores or record.neg_scores is None or not record.neg:
        return None
    return min(record.pos_scores)


def teacher_check(records: list[Record], shown: int = SHOWN) -> TeacherCheck | None:
    """Check every negative against its row's lowest positive; None when no row has both
    positive and negative scores."""
    suspects: list[SuspectNegative] = []
    rows = negatives = flagged_rows = 0
    for rec in records:
        threshold = _lowest_positive(rec)
        if threshold is None:
            continue
        rows += 1
        negatives += len(rec.neg)
        found = [
            SuspectNegative(rec.source, rec.query, text, float(score), float(threshold))
            for text, score in zip(rec.neg, rec.neg_scores or [], strict=True)
            if score >= threshold
        ]
        flagged_rows += bool(found)
        suspects += found
    if not rows:
        return None
    worst = sorted(suspects, key=lambda s: -s.excess)[:shown]
    return TeacherCheck(rows, negatives, len(suspects), flagged_rows, worst)


@dataclass
class TeacherDrop:
    """What ``--drop-teacher-false-negatives MARGIN`` removed (saved in train_summary.json)."""

    margin: float
    removed: int
    rows: int  # rows that lost at least one negative
    checked_rows: int  # rows with positive and negative scores (the others are untouched)

    def line(self) -> str:
        """One line for the train-start announcement."""
        return (
            f"--drop-teacher-false-negatives {self.margin:g}: removed {self.removed:,} negatives "
            f"scored above (lowest positive - {self.margin:g}) from {self.rows:,} of "
            f"{self.checked_rows:,} scored rows"
        )

    def to_json(self) -> dict:
        """Plain JSON."""
        return asdict(self)


def drop_teacher_false_negatives(
    records: list[Record], margin: float
) -> tuple[list[Record], TeacherDrop]:
    """Rows without the negatives whose teacher score is above (lowest positive - margin).

    Refuses data where no row has both positive and negative scores: the option would do
    nothing, silently.
    """
    kept: list[Record] = []
    removed = rows = checked = 0
    for rec in records:
        threshold = _lowest_positive(rec)
        if threshold is None:
            kept.append(rec)
            continue
        checked += 1
        keep = [i for i, s in enumerate(rec.neg_scores or []) if s <= threshold - margin]
        if len(keep) < len(rec.neg):
            rows += 1
            removed += len(rec.neg) - len(keep)
            rec = replace(
                rec,
                neg=[rec.neg[i] for i in keep],
                neg_scores=[(rec.neg_scores or [])[i] for i in keep],
                neg_ids=[rec.neg_ids[i] for i in keep] if rec.neg_ids else rec.neg_ids,
            )
        kept.append(rec)
    if not checked:
        raise UsageError(
            "--drop-teacher-false-negatives: no row has both pos_scores and neg_scores; "
            "score the rows first (embtune score)"
        )
    return kept, TeacherDrop(margin, removed, rows, checked)


def refuse_unscored_rows(records: list[Record]) -> None:
    """--knowledge-distillation: every row must carry teacher scores (one line naming rows)."""
    unscored = [r for r in records if r.pos_scores is None and r.neg_scores is None]
    if not unscored:
        return
    named = ", ".join(r.source or "?" for r in unscored[:SHOWN])
    more = f" and {len(unscored) - SHOWN} more" if len(unscored) > SHOWN else ""
    raise UsageError(
        f"--knowledge-distillation: {len(unscored)} of {len(records)} rows have no teacher "
        f"scores (pos_scores / neg_scores): {named}{more}; add them with `embtune score`, or "
        "pass --allow-unscored-rows to train those rows on the hard term only"
    )
