"""Data audit: what is in a training set before any GPU time is spent on it.

:func:`audit_data` counts, from the validated records and the rows built from them, what the
training loop will see: rows, distinct texts, positives and negatives per query, duplicates,
texts that are both positive and negative for one query (``build_rows`` drops them from the
negatives), negatives shared by many queries. :func:`token_lengths` adds token-length
percentiles and the share of texts cut at the max lengths (tokenized through the on-disk token
cache). `embtune inspect` prints both next to the negatives budget and its findings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from embtune.data.formats import Record, is_blank
from embtune.data.groups import TrainingTexts
from embtune.data.store import TextStore, tokenize_store
from embtune.data.teacher_scores import TeacherCheck, teacher_check
from embtune.errors import shorten

LENGTH_CAP = 4096  # texts are measured up to this many tokens; longer ones count as this
SHARED_SHOWN = 5  # most-shared negatives listed
HISTOGRAM_WIDTH = 30  # characters of the longest histogram bar
TRUNCATION_WARNING = 0.10  # findings: share of texts cut at the max length worth a warning


@dataclass
class CountSummary:
    """How a per-query count (positives, negatives) is spread over the rows."""

    min: int
    median: float
    max: int
    mean: float
    histogram: list[tuple[str, int]]  # (bin label, rows), in increasing order

    def lines(self, label: str) -> list[str]:
        """``label: min, median, max`` then one text bar per histogram bin."""
        out = [f"{label}: min {self.min}, median {self.median:g}, max {self.max}"]
        widest = max((n for _, n in self.histogram), default=0)
        label_width = max((len(b) for b, _ in self.histogram), default=0)
        for bin_label, rows in self.histogram:
            bar = "#" * max(1, round(HISTOGRAM_WIDTH * rows / widest)) if rows else ""
            out.append(f"  {bin_label:>{label_width}} | {bar:<{HISTOGRAM_WIDTH}} {rows}")
        return out

    def to_json(self) -> dict:
        """Plain JSON: the histogram as a list of {"bin", "rows"}."""
        data = asdict(self)
        data["histogram"] = [{"bin": b, "rows": n} for b, n in self.histogram]
        return data


def count_summary(values: list[int] | np.ndarray) -> CountSummary:
    """Min/median/max/mean and a histogram: one bin per value when there are at most 8
    distinct values, else powers of two (0, 1, 2-3, 4-7, ...), so a long tail stays short."""
    counts = np.asarray(values, dtype=np.int64)
    if not len(counts):
        return CountSummary(0, 0.0, 0, 0.0, [])
    distinct = np.unique(counts)
    if len(distinct) <= 8:
        histogram = [(str(v), int((counts == v).sum())) for v in distinct]
    else:
        histogram = []
        low = 0
        while low <= counts.max():
            high = 0 if low == 0 else 2 * low - 1
            rows = int(((counts >= low) & (counts <= high)).sum())
            histogram.append((str(low) if high == low else f"{low}-{high}", rows))
            low = 1 if low == 0 else 2 * low
    return CountSummary(
        min=int(counts.min()),
        median=float(np.median(counts)),
        max=int(counts.max()),
        mean=float(counts.mean()),
        histogram=histogram,
    )


@dataclass
class LengthSummary:
    """Token lengths of a text store (special tokens included, as the model sees them)."""

    texts: int
    max_len: int  # the truncation length training uses
    p50: int
    p90: int
    p99: int
    max: int
    truncated: int  # texts longer than max_len
    capped: bool = False  # some text reached LENGTH_CAP, so ``max`` is a lower bound

    @property
    def truncated_fraction(self) -> float:
        """Share of texts cut at ``max_len``."""
        return self.truncated / self.texts if self.texts else 0.0

    def to_json(self) -> dict:
        """Plain JSON, with the truncated share."""
        return {**asdict(self), "truncated_fraction": self.truncated_fraction}


def length_summary(lengths: np.ndarray, max_len: int, cap: int = LENGTH_CAP) -> LengthSummary:
    """Percentiles (rounded up to whole tokens) and how many lengths exceed ``max_len``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return LengthSummary(0, max_len, 0, 0, 0, 0, 0)
    p50, p90, p99 = (int(np.ceil(np.percentile(lengths, p))) for p in (50, 90, 99))
    return LengthSummary(
        texts=len(lengths),
        max_len=max_len,
        p50=p50,
        p90=p90,
        p99=p99,
        max=int(lengths.max()),
        truncated=int((lengths > max_len).sum()),
        capped=bool((lengths >= cap).any()),
    )


def token_lengths(
    store: TextStore,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    cache_dir: Path | None = None,
    desc: str = "tokenizing",
    show_progress: bool = True,
) -> LengthSummary:
    """Token lengths of every text of ``store`` against the ``max_len`` training truncates at.

    Texts are tokenized up to :data:`LENGTH_CAP` (not ``max_len``) so the percentiles show how
    long texts really are; the token cache keeps the result for the next run.
    """
    cap = max(LENGTH_CAP, max_len + 1)
    table, _ = tokenize_store(store, tokenizer, cap, cache_dir, desc, show_progress)
    return length_summary(table.lengths(), max_len, cap)


@dataclass
class DataAudit:
    """What a training set holds, counted the way training will use it."""

    rows: int
    distinct_queries: int
    distinct_passages: int  # every distinct pos/neg text (after instructions)
    corpus_only_passages: int  # BEIR corpus texts that are no row's pos/neg (fill pool only)
    positives: CountSummary
    negatives: CountSummary  # after build_rows: distinct, none equal to a positive of the row
    empty_texts: int  # empty, whitespace or invisible-only texts (readers refuse them: expect 0)
    duplicate_queries: int  # distinct query texts that head more than one row
    rows_with_duplicate_query: int
    pos_neg_conflicts: int  # (row, text) pairs listed as both positive and negative: dropped
    rows_with_pos_neg_conflict: int
    repeated_negatives: int  # a text listed twice among one row's negatives: kept once
    negatives_shared: int  # distinct negative texts used by more than one query
    most_shared_negatives: list[tuple[str, int]] = field(default_factory=list)  # (text, queries)
    negatives_positive_elsewhere: int = 0  # negatives of one query that are another's positive
    query_lengths: LengthSummary | None = None
    passage_lengths: LengthSummary | None = None
    teacher: TeacherCheck | None = None  # suspected false negatives, when rows have scores

    def lines(self) -> list[str]:
        """The audit as aligned sections of plain text."""
        facts = [
            ("rows (queries)", f"{self.rows:,}"),
            ("distinct queries", f"{self.distinct_queries:,}"),
            ("distinct passages (pos + neg)", f"{self.distinct_passages:,}"),
        ]
        if self.corpus_only_passages:
            facts.append(("corpus passages besides", f"{self.corpus_only_passages:,}"))
        facts += [
            ("empty or whitespace texts", f"{self.empty_texts:,}"),
            (
                "duplicate queries",
                f"{_texts(self.duplicate_queries)} heading {self.rows_with_duplicate_query:,} rows"
                if self.duplicate_queries
                else "none",
            ),
            (
                "both positive and negative",
                f"{_texts(self.pos_neg_conflicts)} in {self.rows_with_pos_neg_conflict:,} rows "
                "(dropped from the negatives)"
                if self.pos_neg_conflicts
                else "none",
            ),
            (
                "negatives listed twice in a row",
                f"{self.repeated_negatives:,} (used once)" if self.repeated_negatives else "none",
            ),
            ("negatives shared by queries", _texts(self.negatives_shared)),
            (
                "negatives that are another query's positive",
                _texts(self.negatives_positive_elsewhere),
            ),
        ]
        width = max(len(name) for name, _ in facts)
        out = [f"{name:<{width}}  {value}" for name, value in facts]
        out += self.positives.lines("positives per query")
        out += self.negatives.lines("negatives per query (as trained)")
        if self.most_shared_negatives:
            out.append("most shared negatives (queries: text)")
            out += [f"  {n:>5}: {shorten(text)}" for text, n in self.most_shared_negatives]
        if self.query_lengths and self.passage_lengths:
            out.append("token lengths     p50    p90    p99    max   truncated at max length")
            for name, s in (("queries", self.query_lengths), ("passages", self.passage_lengths)):
                top = f"{s.max}+" if s.capped else str(s.max)
                out.append(
                    f"  {name:<14}{s.p50:>5}  {s.p90:>5}  {s.p99:>5}  {top:>5}   "
                    f"{s.truncated_fraction:6.1%} of {s.texts:,} at {s.max_len}"
                )
        if self.teacher:
            out += self.teacher.lines()
        return out

    def findings(self) -> list[str]:
        """Warnings about the data, each in plain language with the fix; [] when all is well."""
        out: list[str] = []
        for name, option, s in (
            ("queries", "--query-max-len", self.query_lengths),
            ("passages", "--passage-max-len", self.passage_lengths),
        ):
            if s and s.truncated_fraction > TRUNCATION_WARNING:
                out.append(
                    f"{s.truncated_fraction:.0%} of {name} are longer than {option} {s.max_len} "
                    f"tokens (p90 {s.p90}, p99 {s.p99}) and are cut. Raise {option} (memory and "
                    "time grow with it, up to the model's limit) or accept that their ends are "
                    "not seen."
                )
        if self.duplicate_queries:
            out.append(
                f"{self.duplicate_queries} queries are repeated over "
                f"{self.rows_with_duplicate_query} rows: in one batch, one row's positives are "
                "in-batch negatives of the other. Merge rows with the same query (a row can list "
                "several pos)."
            )
        if self.pos_neg_conflicts:
            out.append(
                f"{_texts(self.pos_neg_conflicts)} in {self.rows_with_pos_neg_conflict} rows are "
                "both positive and negative of the same query; training drops them from the "
                "negatives. Check the labels, or mine with a margin (embtune mine --margin)."
            )
        if self.empty_texts:
            out.append(f"{_texts(self.empty_texts)} are empty or whitespace. Remove them.")
        if self.teacher:
            out += self.teacher.findings()
        return out

    def to_json(self) -> dict:
        """Plain JSON (the "audit" object of `embtune inspect --json`), with its findings."""
        data = asdict(self)
        data["findings"] = self.findings()
        data["positives"] = self.positives.to_json()
        data["negatives"] = self.negatives.to_json()
        data["most_shared_negatives"] = [
            {"text": t, "queries": n} for t, n in self.most_shared_negatives
        ]
        for name in ("query_lengths", "passage_lengths"):
            summary = getattr(self, name)
            data[name] = summary.to_json() if summary else None
        data.pop("teacher")
        data["teacher_check"] = self.teacher.to_json() if self.teacher else None
        return data


def _texts(n: int) -> str:
    return f"{n:,} text" + ("" if n == 1 else "s")


def audit_data(records: list[Record], texts: TrainingTexts) -> DataAudit:
    """Audit validated ``records`` and the rows ``build_rows`` made of them (same order)."""
    rows = texts.rows
    conflicts = [len(set(r.pos) & set(r.neg)) for r in records]
    repeated = sum(len(r.neg) - len(set(r.neg)) for r in records)
    query_uses = Counter(r.query for r in rows)
    repeated_queries = [n for n in query_uses.values() if n > 1]
    in_rows = np.concatenate([np.concatenate([r.pos, r.neg]) for r in rows]) if rows else []
    used_passages = len(np.unique(in_rows))
    all_neg = np.concatenate([r.neg for r in rows]) if rows else np.zeros(0, dtype=np.int64)
    all_pos = np.concatenate([r.pos for r in rows]) if rows else np.zeros(0, dtype=np.int64)
    # Each row's negatives are distinct, so a bincount counts queries per negative.
    per_negative = np.bincount(all_neg, minlength=len(texts.passages))
    shared = np.flatnonzero(per_negative > 1)
    top = shared[np.argsort(-per_negative[shared], kind="stable")][:SHARED_SHOWN]
    empty = sum(
        1
        for r in records
        for t in (r.query, *r.pos, *r.neg)
        if not isinstance(t, str) or is_blank(t)
    )
    return DataAudit(
        rows=len(rows),
        distinct_queries=len(texts.queries),
        distinct_passages=used_passages,
        corpus_only_passages=len(texts.passages) - used_passages,
        positives=count_summary([len(r.pos) for r in rows]),
        negatives=count_summary([len(r.neg) for r in rows]),
        empty_texts=empty,
        duplicate_queries=len(repeated_queries),
        rows_with_duplicate_query=sum(repeated_queries),
        pos_neg_conflicts=sum(conflicts),
        rows_with_pos_neg_conflict=sum(1 for c in conflicts if c),
        repeated_negatives=repeated,
        negatives_shared=len(shared),
        most_shared_negatives=[(texts.passages.texts[i], int(per_negative[i])) for i in top],
        negatives_positive_elsewhere=len(np.intersect1d(all_neg, all_pos)),
        teacher=teacher_check(records),
    )
