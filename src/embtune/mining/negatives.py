"""Hard-negative mining: retrieve, drop positives and likely false negatives, sample.

For each query the whole pool is ranked by exact inner-product search
(:func:`embtune.eval.search.exact_search`, top ``rank_range[1]``), then:

1. **Rank window.** Candidates are the documents at ranks ``rank_range[0]..rank_range[1]``
   (1-based, both ends included). Ranks are counted over the retrieved list *before* positives
   are removed, i.e. they are the positions the model actually gave these documents. This is
   also how FlagEmbedding's ``hn_mine`` counts (it slices the raw search result, then filters),
   except that its ``10-210`` is a 0-based slice, which is ``11:210`` here.
2. **Positives out.** A candidate is dropped when it is one of the query's positives, by id when
   ids are known and always by text (whitespace-normalized, case-sensitive), so a duplicate of a
   positive under another id is never used as a negative. A candidate whose text equals the
   query is dropped too (symmetric data such as NLI puts queries in the pool), and so is a second
   copy of a text already seen for this query.
3. **False-negative guard** (optional). Let ``p`` be the query's *lowest* positive score (the
   strictest choice for multi-positive queries: whatever outscores any positive is suspect).
   With ``margin=m`` a candidate is kept only when ``score <= p - m``; with
   ``relative_margin=r`` only when ``score <= (1 - r) * p``. The relative form assumes positive
   scores above 0 (cosine similarity of a normalized model); with ``p < 0`` its threshold lies
   above ``p``. Every positive is scored directly (query embedding . positive embedding),
   whether or not the search retrieved it, so the guard also works for positives ranked
   outside the window or missing from the pool.
4. **Sampling.** ``negatives`` candidates are drawn without replacement from what is left, with a
   random generator seeded by ``(seed, row index)`` so a row's negatives do not depend on which
   other rows are mined (``--limit`` gives a prefix of the full run). Rows with fewer candidates
   keep them all; they are *not* topped up with random texts (FlagEmbedding does that), and the
   report counts them.

Example::

    enc = Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    result = mine_negatives(enc, ["what is a cell?"], [["A cell is ..."]], corpus, corpus_ids)
    write_mined_jsonl(result.rows, "mined.jsonl")
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from embtune.atomic import atomic_write
from embtune.data.formats import (
    beir_training_records,
    check_text,
    is_beir_dir,
    json_lines,
    load_beir,
    read_flag_jsonl,
    rejected_row_count,
    training_files,
)
from embtune.errors import InputProblem, ProblemCollector, UsageError
from embtune.eval.search import exact_search

log = logging.getLogger(__name__)

DEFAULT_RANGE = (10, 100)
DEFAULT_NEGATIVES = 15


class TextEncoder(Protocol):
    """What mining needs from a model: :class:`embtune.models.encoder.Encoder` satisfies it."""

    def encode_queries(
        self, queries: Sequence[str], batch_size: int = ..., show_progress: bool = ...
    ) -> torch.Tensor:
        """Query embeddings [len(queries), H], in input order."""

    def encode_passages(
        self, passages: Sequence[str], batch_size: int = ..., show_progress: bool = ...
    ) -> torch.Tensor:
        """Passage embeddings [len(passages), H], in input order."""


@dataclass
class MinedRow:
    """One output row: FlagEmbedding's fields plus ids, model scores and ranks for auditing."""

    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float]
    neg_scores: list[float]
    neg_ranks: list[int]  # 1-based rank of each negative in the search result (positives counted)
    query_id: str | None = None
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None
    prompt: str | None = None

    def to_json(self, include_scores: bool = True) -> dict:
        """The row as a FlagEmbedding jsonl object; unknown ids and prompt are left out."""
        out: dict = {"query": self.query, "pos": self.pos, "neg": self.neg}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if include_scores:
            out["pos_scores"] = [round(s, 6) for s in self.pos_scores]
            out["neg_scores"] = [round(s, 6) for s in self.neg_scores]
        if self.query_id is not None:
            out["query_id"] = self.query_id
        if self.pos_ids is not None:
            out["pos_ids"] = self.pos_ids
        if self.neg_ids is not None:
            out["neg_ids"] = self.neg_ids
        out["neg_ranks"] = self.neg_ranks
        return out


@dataclass
class MiningReport:
    """Counts over all queries; each in-window candidate lands in exactly one ``removed_*`` count
    or in ``kept``."""

    queries: int = 0
    negatives_wanted: int = DEFAULT_NEGATIVES
    rank_range: tuple[int, int] = DEFAULT_RANGE
    margin: float | None = None
    relative_margin: float | None = None
    candidates_considered: int = 0  # documents ranked inside the window
    removed_as_positive: int = 0
    removed_same_as_query: int = 0
    removed_duplicate_text: int = 0
    removed_by_margin: int = 0
    kept: int = 0  # candidates left for sampling
    negatives_written: int = 0
    rows_short: int = 0  # rows with fewer than ``negatives_wanted`` negatives (including zero)
    rows_empty: int = 0  # rows with no negative at all
    positives_outside_search: int = 0  # positives not in the top-k, scored directly


@dataclass
class MiningResult:
    """Mined rows, the report, and the embeddings computed on the way (for reuse by callers)."""

    rows: list[MinedRow]
    report: MiningReport
    corpus_embeddings: torch.Tensor  # [len(corpus), H], as passed in or as computed
    query_embeddings: torch.Tensor  # [len(queries), H]


@dataclass
class MiningInput:
    """Queries with their positives and the pool to mine from, read from a BEIR folder or jsonl."""

    queries: list[str]
    positives: list[list[str]]
    corpus_texts: list[str]
    corpus_ids: list[str] | None = None
    query_ids: list[str] | None = None
    positive_ids: list[list[str]] | None = None
    prompts: list[str | None] | None = None
    skipped_queries: int = 0  # BEIR queries of the split without any relevance > 0 judgement
    source: str = ""
    notes: list[str] = field(default_factory=list)
    rejected: list[InputProblem] = field(default_factory=list)  # skip_bad_rows: rows left out


# --- option checks -------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """Parse ``--range A:B`` (1-based ranks, both included, ``1 <= A <= B``)."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        # FlagEmbedding's "10-210" is a 0-based slice; guessing its meaning here would shift
        # every rank by one, so say what the equivalent is instead.
        hint = " (FlagEmbedding's A-B is A+1:B here)" if "-" in str(text) else ""
        raise UsageError(
            f"--range: expected START:END with whole numbers (e.g. 10:100), got {text!r}{hint}"
        )
    start, end = int(parts[0]), int(parts[1])
    check_range((start, end))
    return start, end


def check_range(rank_range: tuple[int, int]) -> None:
    """Raise UsageError unless ``rank_range`` is ``(start, end)`` with ``1 <= start <= end``."""
    start, end = rank_range
    if start < 1:
        raise UsageError(f"--range: ranks start at 1, got start {start}")
    if end < start:
        raise UsageError(f"--range: end {end} is before start {start}")


def check_margins(margin: float | None, relative_margin: float | None) -> None:
    """Raise UsageError for a bad or doubled false-negative guard."""
    if margin is not None and relative_margin is not None:
        raise UsageError("--margin and --relative-margin: give at most one of them")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise UsageError(f"--margin: must be a number >= 0, got {margin}")
    if relative_margin is not None and not (
        math.isfinite(relative_margin) and 0 <= relative_margin < 1
    ):
        raise UsageError(f"--relative-margin: must be in [0, 1), got {relative_margin}")


# --- mining --------------------------------------------------------------------------------


def _norm(text: str) -> str:
    # Positives from jsonl and corpus texts from BEIR differ in incidental whitespace only.
    return " ".join(text.split())


def _threshold(lowest_positive: float, margin: float | None, rel: float | None) -> float:
    if margin is not None:
        return lowest_positive - margin
    if rel is not None:
        return (1.0 - rel) * lowest_positive
    return math.inf


def mine_negatives(
    encoder: TextEncoder,
    queries: Sequence[str],
    positives: Sequence[Sequence[str]],
    corpus_texts: Sequence[str],
    corpus_ids: Sequence[str] | None = None,
    *,
    query_ids: Sequence[str] | None = None,
    positive_ids: Sequence[Sequence[str]] | None = None,
    prompts: Sequence[str | None] | None = None,
    rank_range: tuple[int, int] = DEFAULT_RANGE,
    negatives: int = DEFAULT_NEGATIVES,
    margin: float | None = None,
    relative_margin: float | None = None,
    seed: int = 0,
    corpus_embeddings: torch.Tensor | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> MiningResult:
    """Mine ``negatives`` hard negatives per query from ``corpus_texts`` (see the module doc).

    ``positives[i]`` are query ``i``'s positive texts; ``positive_ids[i]`` (with ``corpus_ids``)
    additionally identifies them by id. ``corpus_embeddings`` ([len(corpus), H], from
    ``encoder.encode_passages``) skips encoding the corpus; the embeddings used are returned in
    the result either way. ``prompts`` are copied to the rows (not used for encoding).
    """
    check_range(rank_range)
    check_margins(margin, relative_margin)
    if negatives < 1:
        raise UsageError(f"--negatives: must be at least 1, got {negatives}")
    per_query = {"query_ids": query_ids, "positive_ids": positive_ids, "prompts": prompts}
    _check_lengths(queries, positives, per_query, corpus_texts, corpus_ids)

    corpus_vectors = _corpus_vectors(
        encoder, corpus_texts, corpus_embeddings, batch_size, show_progress
    )
    query_vectors = (
        encoder.encode_queries(list(queries), batch_size=batch_size, show_progress=show_progress)
        .float()
        .cpu()
    )
    scores, indices = exact_search(query_vectors, corpus_vectors, rank_range[1])
    pool = _Pool.of(corpus_texts, corpus_ids)
    places = _locate_positives(positives, positive_ids, pool)
    positive_vectors = _positive_vectors(
        encoder, positives, places, corpus_vectors, batch_size=batch_size
    )

    report = MiningReport(
        queries=len(queries),
        negatives_wanted=negatives,
        rank_range=tuple(rank_range),
        margin=margin,
        relative_margin=relative_margin,
    )
    rows: list[MinedRow] = []
    for qi, (query, retrieved, retrieved_scores) in enumerate(
        zip(queries, indices.tolist(), scores.tolist(), strict=True)
    ):
        pos_scores = [float(query_vectors[qi] @ v) for v in positive_vectors[qi]]
        in_search = set(retrieved)
        report.positives_outside_search += sum(
            1 for ix in places[qi] if ix is None or ix not in in_search
        )
        candidates = _window_candidates(
            query,
            positives[qi],
            places[qi],
            retrieved,
            retrieved_scores,
            pool,
            rank_range,
            _threshold(min(pos_scores), margin, relative_margin),
            report,
        )
        chosen = _sample(candidates, negatives, seed, qi)
        report.negatives_written += len(chosen)
        if len(chosen) < negatives:
            report.rows_short += 1
        if not chosen:
            report.rows_empty += 1
        rows.append(
            MinedRow(
                query=query,
                pos=list(positives[qi]),
                neg=[corpus_texts[ix] for _, ix, _ in chosen],
                pos_scores=pos_scores,
                neg_scores=[s for _, _, s in chosen],
                neg_ranks=[r for r, _, _ in chosen],
                query_id=query_ids[qi] if query_ids is not None else None,
                pos_ids=list(positive_ids[qi]) if positive_ids is not None else None,
                neg_ids=[corpus_ids[ix] for _, ix, _ in chosen] if corpus_ids is not None else None,
                prompt=prompts[qi] if prompts is not None else None,
            )
        )
    return MiningResult(rows, report, corpus_vectors, query_vectors)


def _check_lengths(
    queries: Sequence[str],
    positives: Sequence[Sequence[str]],
    per_query: dict[str, Sequence | None],
    corpus_texts: Sequence[str],
    corpus_ids: Sequence[str] | None,
) -> None:
    """ValueError when the per-query or per-text inputs do not line up; UsageError for no pool."""
    if len(positives) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(positives)} positive lists")
    for name, values in per_query.items():
        if values is not None and len(values) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(values)} {name}")
    if corpus_ids is not None and len(corpus_ids) != len(corpus_texts):
        raise ValueError(f"{len(corpus_texts)} corpus texts but {len(corpus_ids)} corpus ids")
    if not corpus_texts:
        raise UsageError("the candidate pool is empty: nothing to mine from")


def _corpus_vectors(
    encoder: TextEncoder,
    corpus_texts: Sequence[str],
    given: torch.Tensor | None,
    batch_size: int,
    show_progress: bool,
) -> torch.Tensor:
    """The pool's embeddings (float32, CPU): ``given`` when the caller has them, else encoded."""
    if given is None:
        given = encoder.encode_passages(
            list(corpus_texts), batch_size=batch_size, show_progress=show_progress
        )
    elif given.shape[0] != len(corpus_texts):
        raise ValueError(
            f"corpus_embeddings has {given.shape[0]} rows for {len(corpus_texts)} texts"
        )
    return given.float().cpu()


@dataclass
class _Pool:
    """The candidate pool with its texts whitespace-normalized and indexed by text and by id."""

    normalized: list[str]
    by_text: dict[str, int]  # first index of each normalized text
    by_id: dict[str, int]

    @classmethod
    def of(cls, texts: Sequence[str], ids: Sequence[str] | None) -> _Pool:
        normalized = [_norm(t) for t in texts]
        by_text: dict[str, int] = {}
        for i, t in enumerate(normalized):
            by_text.setdefault(t, i)
        by_id = {d: i for i, d in enumerate(ids)} if ids is not None else {}
        return cls(normalized, by_text, by_id)

    def find(self, text: str, doc_id: str | None) -> int | None:
        """Pool index of a text: by id when given and known, else by text; None when absent."""
        found = self.by_id.get(doc_id) if doc_id is not None else None
        return found if found is not None else self.by_text.get(_norm(text))


def _locate_positives(
    positives: Sequence[Sequence[str]],
    positive_ids: Sequence[Sequence[str]] | None,
    pool: _Pool,
) -> list[list[int | None]]:
    """Each query's positives as pool indices, None for a positive the pool does not hold."""
    places = []
    for qi, texts in enumerate(positives):
        ids = positive_ids[qi] if positive_ids is not None else [None] * len(texts)
        places.append([pool.find(text, pid) for text, pid in zip(texts, ids, strict=True)])
    return places


def _positive_vectors(
    encoder: TextEncoder,
    positives: Sequence[Sequence[str]],
    places: list[list[int | None]],
    corpus_vectors: torch.Tensor,
    batch_size: int,
) -> list[list[torch.Tensor]]:
    """Each query's positive embeddings, so the guard can score positives the search missed.

    Positives outside the pool (jsonl with --candidates) are encoded here, each distinct text
    once, in one batch.
    """
    missing: dict[str, int] = {}
    for texts, row in zip(positives, places, strict=True):
        for text, ix in zip(texts, row, strict=True):
            if ix is None:
                missing.setdefault(text, len(missing))
    extra = (
        encoder.encode_passages(list(missing), batch_size=batch_size, show_progress=False)
        .float()
        .cpu()
        if missing
        else torch.empty(0, corpus_vectors.shape[1])
    )
    return [
        [
            corpus_vectors[ix] if ix is not None else extra[missing[text]]
            for text, ix in zip(texts, row, strict=True)
        ]
        for texts, row in zip(positives, places, strict=True)
    ]


def _window_candidates(
    query: str,
    positives: Sequence[str],
    places: list[int | None],
    retrieved: list[int],
    retrieved_scores: list[float],
    pool: _Pool,
    rank_range: tuple[int, int],
    limit: float,
    report: MiningReport,
) -> list[tuple[int, int, float]]:
    """The (rank, pool index, score) of each usable candidate in the rank window.

    Each candidate in the window is counted in ``report``: kept, or removed for the first of the
    module doc's reasons that applies.
    """
    start, end = rank_range
    # Both checks: a positive found by id may have a copy under another id, caught by its text.
    pos_places = {ix for ix in places if ix is not None}
    pos_texts = {_norm(t) for t in positives}
    query_text = _norm(query)
    kept: list[tuple[int, int, float]] = []
    seen: set[str] = set()
    for rank in range(start, min(end, len(retrieved)) + 1):
        ix, score = retrieved[rank - 1], retrieved_scores[rank - 1]
        text = pool.normalized[ix]
        report.candidates_considered += 1
        if ix in pos_places or text in pos_texts:
            report.removed_as_positive += 1
        elif text == query_text:
            report.removed_same_as_query += 1
        elif text in seen:
            report.removed_duplicate_text += 1
        elif score > limit:
            report.removed_by_margin += 1
        else:
            kept.append((rank, ix, score))
        seen.add(text)
    report.kept += len(kept)
    return kept


def _sample(
    candidates: list[tuple[int, int, float]], negatives: int, seed: int, row: int
) -> list[tuple[int, int, float]]:
    """``negatives`` of the candidates in rank order, or all of them when there are no more."""
    # A per-row generator: the same row gets the same negatives however many rows are mined.
    rng = random.Random(f"{seed}:{row}")
    return sorted(rng.sample(candidates, negatives)) if len(candidates) > negatives else candidates


# --- input and output ----------------------------------------------------------------------


def read_candidates(path: Path) -> tuple[list[str], list[str] | None]:
    """Read a candidate pool: jsonl with ``text`` (or FlagEmbedding's old ``content``) per line.

    An optional ``title`` is joined BEIR-style (title + " " + text), so a BEIR corpus.jsonl works
    too. Returns (texts, ids); ids come from ``_id``/``id`` and are None unless every line has one.
    Raises InputError naming file:line:field for bad lines.
    """
    problems = ProblemCollector()
    texts: list[str] = []
    ids: list[str | None] = []
    if not Path(path).is_file():
        raise UsageError(f"--candidates: file {path} does not exist")
    for number, row in json_lines(Path(path), problems):
        if not isinstance(row, dict):
            problems.add(
                str(path), number, None, f"expected a JSON object, got {type(row).__name__}"
            )
            continue
        key = "text" if "text" in row else "content" if "content" in row else None
        if key is None:
            problems.add(str(path), number, "text", "missing (expected 'text' or 'content')")
            continue
        if reason := check_text(row[key]):
            problems.add(str(path), number, key, reason)
            continue
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            problems.add(
                str(path), number, "title", f"must be a string, got {type(title).__name__}"
            )
            continue
        texts.append(f"{title} {row[key]}".strip() if title else row[key])
        raw_id = row.get("_id", row.get("id"))
        ids.append(None if raw_id is None or isinstance(raw_id, bool) else str(raw_id))
    problems.raise_if_any()
    # The same text twice would only waste search slots; keep the first occurrence.
    out_texts: list[str] = []
    out_ids: list[str | None] = []
    seen: set[str] = set()
    for text, doc_id in zip(texts, ids, strict=True):
        if _norm(text) not in seen:
            seen.add(_norm(text))
            out_texts.append(text)
            out_ids.append(doc_id)
    if all(i is not None for i in out_ids) and len(set(out_ids)) == len(out_ids):
        return out_texts, [i for i in out_ids if i is not None]
    return out_texts, None


def load_mining_input(
    data: Path,
    split: str = "train",
    candidates: Path | None = None,
    limit: int | None = None,
    *,
    skip_bad_rows: bool = False,
) -> MiningInput:
    """Read queries, positives and the pool from a BEIR folder (one split) or FlagEmbedding jsonl.

    BEIR: queries of ``split`` with a relevance > 0 judgement; positives are those documents; the
    pool is corpus.jsonl. jsonl (a file, or a folder of .json/.jsonl): the pool is ``candidates``
    or, without it, every distinct pos/neg text of the input (as FlagEmbedding's hn_mine does).
    ``limit`` keeps the first N queries; the pool is never cut. ``skip_bad_rows``: bad rows of
    ``data`` are left out and listed in ``rejected`` instead of refusing (``candidates`` is
    always read strictly).
    """
    data = Path(data)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {limit}")
    if not data.exists():
        raise UsageError(f"--data: {data} does not exist")
    if is_beir_dir(data):
        if candidates is not None:
            raise UsageError(
                "--candidates: only used with FlagEmbedding jsonl --data; a BEIR folder's "
                "corpus.jsonl is the pool"
            )
        beir = load_beir(data, split, skip_bad_rows=skip_bad_rows)
        records = beir_training_records(beir, data, split)
        skipped = len(beir.qrels) - len(records)
        if not records:
            count = rejected_row_count(beir.rejected)
            left_out = f" ({count} bad rows left out)" if beir.rejected else ""
            raise UsageError(
                f"--data: {data} split {split!r} has no query with a relevant document{left_out}"
            )
        records = records[:limit] if limit else records
        return MiningInput(
            queries=[r.query for r in records],
            positives=[r.pos for r in records],
            corpus_texts=list(beir.corpus.values()),
            corpus_ids=list(beir.corpus),
            query_ids=[r.query_id or "" for r in records],
            positive_ids=[r.pos_ids or [] for r in records],
            skipped_queries=skipped,
            source=f"{data} ({split})",
            rejected=beir.rejected,
        )
    files = training_files(data)
    if not files:
        raise UsageError(f"--data: {data} is neither a BEIR folder nor holds .json/.jsonl files")
    records = read_flag_jsonl(files, skip_bad_rows=skip_bad_rows)
    rejected = records.rejected
    if not records:
        left_out = f" ({rejected_row_count(rejected)} bad rows left out)" if rejected else ""
        raise UsageError(f"--data: {data} has no rows{left_out}")
    pool_records = records
    records = records[:limit] if limit else records
    notes: list[str] = []
    if candidates is not None:
        corpus_texts, corpus_ids = read_candidates(candidates)
    else:
        corpus_ids = None
        seen: set[str] = set()
        corpus_texts = []
        for r in pool_records:
            for text in [*r.pos, *r.neg]:
                if _norm(text) not in seen:
                    seen.add(_norm(text))
                    corpus_texts.append(text)
        notes.append(f"pool: the {len(corpus_texts)} distinct pos/neg texts of the input")
    if any(r.neg for r in records):
        notes.append("existing 'neg' lists (and input pos/neg scores) are replaced by mined ones")
    return MiningInput(
        queries=[r.query for r in records],
        positives=[r.pos for r in records],
        corpus_texts=corpus_texts,
        corpus_ids=corpus_ids,
        prompts=[r.prompt for r in records],
        source=", ".join(map(str, files)),
        notes=notes,
        rejected=rejected,
    )


def write_mined_jsonl(
    rows: Sequence[MinedRow], path: str | Path, include_scores: bool = True
) -> None:
    """Write rows as FlagEmbedding jsonl, atomically: readers see the old file or the whole new one.

    The rows go to a temporary file in the same folder (same file system, so the final
    ``os.replace`` is atomic); on any error the temporary file is removed and ``path`` untouched.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row.to_json(include_scores), ensure_ascii=False) + "\n")

    atomic_write(path, write)


__all__ = [
    "MinedRow",
    "MiningInput",
    "MiningReport",
    "MiningResult",
    "check_margins",
    "check_range",
    "load_mining_input",
    "mine_negatives",
    "parse_range",
    "read_candidates",
    "write_mined_jsonl",
]
