"""Candidate lists to rerank, read from a file: a TREC run or jsonl.

* A TREC run, trec_eval's input: ``qid Q0 docid rank score tag`` on each line, separated by
  white space. A query's documents are ranked as trec_eval ranks them: by score, descending,
  ties by doc id, descending; the rank column is not read (trec_eval ignores it too).
* jsonl: ``{"query_id": "q1", "doc_ids": ["d3", "d1", ...]}`` on each line, best first
  (``qid`` and ``docids`` are read too).

The first character tells which: ``{`` starts jsonl. Problems are reported as the data readers
report theirs (data/formats.py), one line each naming file, line and field, up to 20 at once: a
line of the wrong shape, an empty list, a query or document id the BEIR folder does not have,
a score that is not a number, a query given twice (jsonl) or a document twice for one query.

Example::

    data = load_beir(Path("scifact"), "test")
    lists = read_candidates("bm25.trec", data)  # {"1": ["31715818", ...], ...}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.data.formats import UTF8_BOM, json_lines, text_lines
from embtune.errors import ProblemCollector, shorten
from embtune.eval.retrieval import rank_documents

if TYPE_CHECKING:
    from embtune.data.formats import BeirDataset

TREC_COLUMNS = ("qid", "Q0", "docid", "rank", "score", "tag")
QUERY_FIELDS = ("query_id", "qid")  # the first is the documented name, the others accepted
DOCS_FIELDS = ("doc_ids", "docids")

Problem = tuple[str | None, str]  # (field, reason)


def read_candidates(path: str | Path, data: BeirDataset) -> dict[str, list[str]]:
    """Each query's candidates in the file ``path``, best first: {query id: [doc id, ...]}.

    Queries come in the file's order; every id is checked against ``data`` (its
    queries.jsonl and corpus.jsonl). Raises :class:`~embtune.errors.InputError` naming file,
    line and field of each problem.
    """
    path = Path(path)
    problems = ProblemCollector()
    if not path.is_file():
        reason = "is not a file" if path.exists() else "file does not exist"
        problems.add(str(path), None, None, reason)
        problems.raise_if_any()
    reader = _jsonl_lists if _starts_like_json(path) else _trec_lists
    lists = reader(path, data, problems)
    problems.raise_if_any()
    return lists


def _starts_like_json(path: Path) -> bool:
    """True when the file's first character (after a byte-order mark and blanks) is ``{``."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:  # the line reader reports why the file cannot be read
        return False
    return head.removeprefix(UTF8_BOM).lstrip()[:1] == b"{"


def _unknown(kind: str, key: str, file: str) -> str:
    return f"unknown {kind} id {shorten(key)} (not in {file})"


# --- TREC run ------------------------------------------------------------------------------


def _trec_lists(path: Path, data: BeirDataset, problems: ProblemCollector) -> dict[str, list[str]]:
    """A TREC run's documents of each query, ranked by score (trec_eval's order)."""
    scores: dict[str, dict[str, float]] = {}
    first_line: dict[tuple[str, str], int] = {}  # (qid, docid) -> the line giving it
    for number, line in text_lines(path, problems):
        parts = line.split()
        if len(parts) != len(TREC_COLUMNS):
            shape = " ".join(TREC_COLUMNS)
            problems.add(str(path), number, None, f"expected 6 columns '{shape}', got {len(parts)}")
            continue
        qid, _, did, _, score, _ = parts
        if problem := _trec_problem(qid, did, score, data, first_line.get((qid, did))):
            problems.add(str(path), number, *problem)
            continue
        first_line[(qid, did)] = number
        scores.setdefault(qid, {})[did] = float(score)
    return {qid: rank_documents(docs) for qid, docs in scores.items()}


def _trec_problem(
    qid: str, did: str, score: str, data: BeirDataset, first: int | None
) -> Problem | None:
    """Why one TREC line cannot be used (``first``: the line that gave the pair before)."""
    if qid not in data.queries:
        return "qid", _unknown("query", qid, "queries.jsonl")
    if did not in data.corpus:
        return "docid", _unknown("document", did, "corpus.jsonl")
    try:
        number = float(score)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        return "score", f"must be a number, got {shorten(score)}"
    if first is not None:
        twice = f"{shorten(did)} is given twice for query {shorten(qid)}"
        return "docid", f"{twice} (first on line {first})"
    return None


# --- jsonl ---------------------------------------------------------------------------------


def _jsonl_lists(path: Path, data: BeirDataset, problems: ProblemCollector) -> dict[str, list[str]]:
    """Each row's doc ids, in the order given."""
    lists: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}  # query id -> the line giving it
    for number, row in json_lines(path, problems):
        qid, problem = _query_id(row, data)
        if qid is not None and qid in first_line:
            field = _field(row, QUERY_FIELDS)
            problem = field, f"{shorten(qid)} is given twice (first on line {first_line[qid]})"
        docs, docs_problem = _doc_ids(row, data) if problem is None else ([], None)
        if problem := problem or docs_problem:
            problems.add(str(path), number, *problem)
            continue
        assert qid is not None
        first_line[qid] = number
        lists[qid] = docs
    return lists


def _field(row: object, names: tuple[str, ...]) -> str:
    """The spelling of a field the row uses (the documented one when it has none)."""
    found = [name for name in names if isinstance(row, dict) and name in row]
    return found[0] if found else names[0]


def _id_problem(value: object) -> str | None:
    """Why a value is no id (BEIR ids are strings; whole numbers are read as strings too)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"must be a string, got {type(value).__name__}"
    return None


def _query_id(row: object, data: BeirDataset) -> tuple[str | None, Problem | None]:
    """(the row's query id, None), or (None, its problem)."""
    if not isinstance(row, dict):
        return None, (None, f"expected a JSON object, got {type(row).__name__}")
    field = _field(row, QUERY_FIELDS)
    if (value := row.get(field)) is None:
        return None, (field, "missing")
    if reason := _id_problem(value):
        return None, (field, reason)
    if str(value) not in data.queries:
        return None, (field, _unknown("query", str(value), "queries.jsonl"))
    return str(value), None


def _doc_ids(row: dict, data: BeirDataset) -> tuple[list[str], Problem | None]:
    """(the row's doc ids, None), or ([], their problem)."""
    field = _field(row, DOCS_FIELDS)
    docs = row.get(field)
    if docs is None:
        return [], (field, "missing")
    if not isinstance(docs, list):
        return [], (field, f"must be a list of doc ids, got {type(docs).__name__}")
    if not docs:
        return [], (field, "must not be empty (leave the query out instead: it then scores 0)")
    for i, value in enumerate(docs):
        if reason := _id_problem(value):
            return [], (field, f"item {i} {reason}")
    ids = [str(value) for value in docs]
    if unknown := [d for d in ids if d not in data.corpus]:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        return [], (field, _unknown("document", unknown[0], "corpus.jsonl") + more)
    if len(set(ids)) != len(ids):
        twice = next(d for i, d in enumerate(ids) if d in ids[:i])
        return [], (field, f"{shorten(twice)} is given twice")
    return ids, None
