"""Readers for training and evaluation data, with validation that names file, line and field.

Two layouts are understood:

* FlagEmbedding jsonl, unchanged: one JSON object per line with ``query`` (str), ``pos``
  (list of str), optional ``neg`` (list of str), ``pos_scores`` / ``neg_scores`` (numbers, same
  lengths as ``pos`` / ``neg``) and ``prompt`` (str, this row's query instruction). Other keys
  (FlagEmbedding's ``type``, for example) are ignored. A ``.json`` file may instead hold one
  JSON array of such objects. ``\n``, ``\r\n`` and ``\r`` all end a line.
* BEIR: a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score`` with a header,
  integer grades). For training, each query with a relevant document becomes one row whose
  ``pos`` are those documents (text = title + " " + text) and whose ``neg`` is empty. Only the
  queries the split's qrels name are validated.

Every reader validates the whole input before returning and raises :class:`InputError` with up
to 20 problems, so nothing is trained (or written) on half-valid data. With
``skip_bad_rows=True`` a bad row is left out instead and listed in the result's ``rejected``
(:func:`write_rejected_rows` writes them); problems with a whole file still refuse.
:func:`write_beir` writes a dev set held in memory back in the BEIR layout.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embtune.atomic import atomic_write
from embtune.errors import InputError, InputProblem, ProblemCollector, shorten
from embtune.text_files import foreign_encoding

TRAIN_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One validated training row, FlagEmbedding's fields plus where it came from."""

    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    source: str = ""  # "file:line", for messages that point back at the data
    query_id: str | None = None  # BEIR ids, kept for traceability
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None


@dataclass
class BeirDataset:
    """A BEIR folder read for one split: texts by id and graded relevance judgements."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    # With skip_bad_rows: every problem of a row left out (query, document or judgement).
    rejected: list[InputProblem] = field(default_factory=list)
    # Bad queries.jsonl rows whose ids this split does not use: neither read nor refused.
    ignored_bad_rows: int = 0

    def split_queries(self) -> dict[str, str]:
        """The queries that have judgements in this split, in qrels order."""
        return {qid: self.queries[qid] for qid in self.qrels}


def is_beir_dir(path: Path) -> bool:
    """True when ``path`` is a folder in BEIR layout."""
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "qrels").is_dir()


def _read_raw(path: Path, problems: ProblemCollector) -> bytes | None:
    """The file's bytes, or None after recording why they are unusable (unreadable, empty...)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.add(str(path), None, None, f"cannot read file: {exc.strerror or exc}")
        return None
    if not raw.strip():
        # /dev/null or a pipe that gave nothing is no mistake in the file: with nothing else
        # to read, the caller says "no training rows found".
        if path.is_file():
            problems.add(str(path), None, None, "file is empty")
        return None
    if encoding := foreign_encoding(raw):
        problems.add(str(path), 1, None, f"file is {encoding}; save it as UTF-8")
        return None
    return raw


UTF8_BOM = b"\xef\xbb\xbf"


def _decode_line(
    path: Path, number: int, line: bytes, problems: ProblemCollector, whole_file: bool = False
) -> str | None:
    """One line as text, or None after recording why it is not UTF-8.

    The problem is the line's own (left out with skip_bad_rows) unless ``whole_file``: a bad
    line inside a JSON array spoils the whole array.
    """
    report = problems.add if whole_file else problems.reject
    if line.startswith(UTF8_BOM):
        if number == 1:
            line = line[3:]  # a UTF-8 byte-order mark is harmless at the start; accept it
        else:
            report(str(path), number, None, "byte-order mark inside the file (files concatenated?)")
            return None
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        report(str(path), number, None, f"not valid UTF-8 (byte {exc.start})")
        return None


def text_lines(path: Path, problems: ProblemCollector) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each non-blank line of a text file (qrels, a TREC run);
    an unreadable or empty file, or a line that is not UTF-8, becomes a problem."""
    raw = _read_raw(path, problems)
    if raw is None:
        return
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue
        line = _decode_line(path, number, raw_line, problems)
        if line is not None:
            yield number, line


def json_lines(path: Path, problems: ProblemCollector) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed value) for each row; bad lines become problems.

    Rows are the file's non-blank lines (JSON lines) or, for a file holding one JSON array, its
    elements, numbered by the line each starts on (see :func:`json_values`).
    """
    for number, _, value in json_values(path, problems):
        yield number, value


def json_values(path: Path, problems: ProblemCollector) -> Iterator[tuple[int, int | None, object]]:
    """Yield (line number, array element or None, parsed value) for each row of a file.

    A file that is one JSON array (FlagEmbedding loads such ``.json`` files through
    ``datasets``) yields its elements; the element index is given when another element starts
    on the same line, so that a one-line array still names which row is wrong.
    """
    raw = _read_raw(path, problems)
    if raw is None:
        return
    if raw.removeprefix(UTF8_BOM).lstrip()[:1] == b"[":
        elements = _array_elements(path, raw, problems)
        if elements is not None:
            yield from elements
            return
    for number, value in _line_values(path, raw, problems):
        yield number, None, value


def _line_values(
    path: Path, raw: bytes, problems: ProblemCollector
) -> Iterator[tuple[int, object]]:
    """JSON lines: (line number, value) for each non-blank line."""
    # \r\n, \n and a lone \r (old Mac files) all end a line, as editors count lines; a JSON
    # row cannot hold a raw \r inside a string, so only whitespace between tokens could be one.
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if problems.full:
            problems.truncated = True
            return
        text = _decode_line(path, number, line, problems)
        if text is None:
            continue
        try:
            # NaN/Infinity parse as floats so the field check can name the field they are in.
            value = json.loads(text)
        except ValueError as exc:
            problems.reject(str(path), number, None, f"malformed JSON: {exc}")
            continue
        except RecursionError:
            problems.reject(str(path), number, None, "malformed JSON: nested too deeply")
            continue
        yield number, value


LINE_END = re.compile(r"\r\n|\r|\n")
JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _array_elements(
    path: Path, raw: bytes, problems: ProblemCollector
) -> list[tuple[int, int | None, object]] | None:
    """The elements of a file that is one JSON array, or None when it is JSON lines after all.

    A first line that parses on its own (``[1, 2]`` then more lines: "Extra data") means JSON
    lines whose first row is an array, left to the line reader to name. Other errors are
    reported at their line for a ``.json`` file, and left to the line reader otherwise; other
    files are read as an array only when every element is an object (a row).
    """
    try:
        text = raw.removeprefix(UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError:
        if path.suffix != ".json":
            return None
        # Name every line that is not UTF-8 (the line reader's check), nothing else: reading
        # the rest line by line would report each line of a pretty-printed array as broken.
        for number, line in enumerate(raw.splitlines(), start=1):
            if not problems.full:
                _decode_line(path, number, line, problems, whole_file=True)
        return []
    starts = [0] + [m.end() for m in LINE_END.finditer(text)]
    try:
        found = _walk_array(text)
    except ValueError as exc:
        if getattr(exc, "msg", "") == "Extra data" or path.suffix != ".json":
            return None
        pos = getattr(exc, "pos", 0)
        line = bisect.bisect_right(starts, pos)
        column = pos - starts[line - 1] + 1
        message = f"malformed JSON: {getattr(exc, 'msg', exc)}: column {column}"
        problems.add(str(path), line, None, message)
        return []
    except RecursionError:
        if path.suffix != ".json":
            return None
        problems.add(str(path), None, None, "malformed JSON: nested too deeply")
        return []
    if path.suffix != ".json" and not all(isinstance(value, dict) for _, value in found):
        return None  # a .jsonl row that is an array: the line reader says it is not an object
    lines = [bisect.bisect_right(starts, pos) for pos, _ in found]
    shared = {n for n, count in Counter(lines).items() if count > 1}
    out: list[tuple[int, int | None, object]] = []
    for index, (line, (_, value)) in enumerate(zip(lines, found, strict=True)):
        out.append((line, index if line in shared else None, value))
    return out


def _walk_array(text: str) -> list[tuple[int, object]]:
    """(start position, value) of each element of the JSON array ``text``.

    Raises json's own error (message and position) for anything that is not one array.
    """
    decoder = json.JSONDecoder()
    found: list[tuple[int, object]] = []
    try:
        pos = JSON_SPACE.match(text, text.index("[") + 1).end()
        if text[pos] != "]":
            while True:
                value, end = decoder.raw_decode(text, pos)
                found.append((pos, value))
                pos = JSON_SPACE.match(text, end).end()
                if text[pos] != ",":
                    break
                pos = JSON_SPACE.match(text, pos + 1).end()
        if text[pos] != "]" or text[pos + 1 :].strip(" \t\n\r"):
            raise ValueError
    except (ValueError, IndexError):
        json.loads(text)  # raises the error with json's message and position
        raise
    return found


# What a reader sees as nothing. By Unicode category rather than a hand list, so every
# separator (Zs: spaces of all widths, Zl, Zp), control (Cc) and format character (Cf: zero-width
# space U+200B, joiners U+200C/D, word joiner U+2060, byte-order mark U+FEFF, soft hyphen, bidi
# marks, ...) is covered, including ones added in later Unicode versions. Tokenizers drop most of
# these (BERT's normalizer removes Cc/Cf), so such a text trains as an empty one.
INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
# Default-ignorable characters filed under other categories: the Hangul fillers (Lo), the
# combining grapheme joiner and variation selectors (Mn), plus the blank Braille pattern, which
# renders as nothing and is a common stand-in for "empty".
INVISIBLE_EXTRA = frozenset(
    "\u034f\u115f\u1160\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def _invisible(char: str) -> bool:
    return char in INVISIBLE_EXTRA or unicodedata.category(char) in INVISIBLE_CATEGORIES


def is_blank(text: str) -> bool:
    """True when ``text`` is empty or holds only whitespace and invisible characters."""
    # any() stops at the first visible character, so ordinary texts cost one lookup.
    return not any(not _invisible(char) for char in text)


def blank_problem(text: str) -> str | None:
    """The reason ``text`` is refused as empty (naming invisible characters), or None."""
    if not text.strip():
        return "must not be empty or whitespace"
    if not is_blank(text):
        return None
    shown = [f"U+{ord(c):04X}" for c in sorted({c for c in text if not c.isspace()})]
    listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
    return f"must not be empty or whitespace (it holds only invisible characters: {listed})"


def check_text(value: object) -> str | None:
    """The reason a value is not a usable text, or None when it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if reason := blank_problem(value):
        return reason
    return _surrogate_problem(value)


def _surrogate_problem(value: str) -> str | None:
    """JSON's \\uD800-style escapes can encode half a character, which no tokenizer accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an unpaired surrogate escape \\u{ord(value[exc.start]):04x}"
    return None


def check_text_list(value: object, allow_empty: bool) -> str | None:
    """The reason a value is not a list of usable texts (naming the first bad item), or None."""
    if not isinstance(value, list):
        return f"must be a list of strings, got {type(value).__name__}"
    if not value and not allow_empty:
        return "must not be an empty list"
    for i, item in enumerate(value):
        reason = check_text(item)
        if reason:
            return f"item {i} {reason}"
    return None


def _check_scores(value: object, expected: int, texts_field: str) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of numbers, got {type(value).__name__}"
    if len(value) != expected:
        return f"has {len(value)} scores but '{texts_field}' has {expected} texts"
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float):
            return f"item {i} must be a number, got {type(item).__name__}"
        try:
            finite = math.isfinite(item)
        except OverflowError:  # a JSON integer too large for a float
            finite = False
        if not finite:
            return f"item {i} is not a finite number"
    return None


def _row_problems(row: object) -> list[tuple[str | None, str]]:
    """Every (field, reason) wrong with one parsed FlagEmbedding row."""
    if not isinstance(row, dict):
        return [(None, f"expected a JSON object, got {type(row).__name__}")]
    found: list[tuple[str | None, str]] = []
    for name in ("query", "pos"):
        if name not in row:
            found.append((name, "missing"))
    if "query" in row and (reason := check_text(row["query"])):
        found.append(("query", reason))
    if "pos" in row and (reason := check_text_list(row["pos"], allow_empty=False)):
        found.append(("pos", reason))
    if "neg" in row and (reason := check_text_list(row["neg"], allow_empty=True)):
        found.append(("neg", reason))
    for scores, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        texts_ok = isinstance(row.get(texts), list) or (texts == "neg" and "neg" not in row)
        if scores in row and row[scores] is not None and texts_ok:
            expected = len(row.get(texts) or [])
            if reason := _check_scores(row[scores], expected, texts):
                found.append((scores, reason))
    if row.get("prompt") is not None and (reason := check_text(row["prompt"])):
        found.append(("prompt", reason))
    return found


def _floats(scores: list[int | float] | None) -> list[float] | None:
    """Scores as floats: JSON's ``1`` and ``1.0`` are the same teacher score."""
    return None if scores is None else [float(s) for s in scores]


class RecordList(list[Record]):
    """The records a reader returns, plus the problems of the rows it left out."""

    def __init__(
        self, records: Iterable[Record] = (), rejected: Iterable[InputProblem] = ()
    ) -> None:
        super().__init__(records)
        self.rejected: list[InputProblem] = list(rejected)


def read_flag_jsonl(
    paths: list[Path],
    problems: ProblemCollector | None = None,
    *,
    skip_bad_rows: bool = False,
) -> RecordList:
    """Read FlagEmbedding jsonl files into validated records (raises InputError on problems).

    With ``skip_bad_rows`` (or a ``problems`` collector made with it, whose setting then
    decides), a bad row is left out and its problems are listed in the result's ``rejected``;
    a file that cannot be read at all still refuses.
    """
    if problems is not None and skip_bad_rows and not problems.skip_bad_rows:
        raise ValueError("skip_bad_rows=True with a collector made without it")
    own = problems is None
    problems = problems or ProblemCollector(skip_bad_rows=skip_bad_rows)
    already_rejected = len(problems.rejected)
    records = [
        Record(
            query=row["query"],
            pos=list(row["pos"]),
            neg=list(row.get("neg") or []),
            pos_scores=_floats(row.get("pos_scores")),
            neg_scores=_floats(row.get("neg_scores")),
            prompt=row.get("prompt"),
            source=f"{path}:{number}",
        )
        for path, number, row in flag_rows(paths, problems)
    ]
    if own:
        problems.raise_if_any()
    return RecordList(records, problems.rejected[already_rejected:])


def flag_rows(paths: list[Path], problems: ProblemCollector) -> Iterator[tuple[Path, int, dict]]:
    """(file, line, the JSON object as read) of each valid FlagEmbedding row of ``paths``.

    The objects are the parsed lines themselves, every field kept in its order, for writers
    that pass rows through (`embtune score`); the problems of the other rows go to
    ``problems`` (with its skip_bad_rows, those rows are only left out and listed).
    """
    for path in paths:
        for number, element, row in json_values(path, problems):
            found = _row_problems(row)
            for name, reason in found:
                where = "" if element is None else f" (array element {element})"
                problems.reject(str(path), number, name, reason + where)
            if found:
                continue
            assert isinstance(row, dict)
            yield path, number, row


@dataclass
class _IdTexts:
    """A BEIR corpus or queries file as read: texts by id and what was refused."""

    texts: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # id -> line of the row kept
    refused: dict[str, InputProblem] = field(default_factory=dict)  # id -> its bad row's problem
    ignored: int = 0  # bad rows whose ids the split does not use


def _row_id(row: object) -> tuple[str | None, tuple[str | None, str] | None]:
    """(the row's id, None) or (None, (field, reason)) when the row has no usable id."""
    if not isinstance(row, dict):
        return None, (None, f"expected a JSON object, got {type(row).__name__}")
    doc_id = row.get("_id")
    if doc_id is None:
        return None, ("_id", "missing")
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        return None, ("_id", f"must be a string, got {type(doc_id).__name__}")
    doc_id = str(doc_id)
    reason = "must not be empty or whitespace" if not doc_id.strip() else None
    if reason := reason or _surrogate_problem(doc_id):
        return None, ("_id", reason)
    return doc_id, None


def _row_text(row: dict, with_title: bool) -> tuple[str, tuple[str, str] | None]:
    """(the row's text, None) or ("", (field, reason)) when it has no usable text."""
    body = row.get("text")
    title = row.get("title", "") if with_title else ""
    if body is None:
        return "", ("text", "missing")
    if not isinstance(body, str):
        return "", ("text", f"must be a string, got {type(body).__name__}")
    if title is None:
        title = ""
    if not isinstance(title, str):
        return "", ("title", f"must be a string, got {type(title).__name__}")
    # BEIR's convention (and the MTEB figures we reproduce): title + " " + text.
    text = f"{title} {body}".strip() if title else body.strip()
    if reason := blank_problem(text):
        return "", ("text", reason)
    if reason := _surrogate_problem(text):
        return "", ("title" if _surrogate_problem(title) else "text", reason)
    return text, None


def _read_id_texts(
    path: Path, problems: ProblemCollector, with_title: bool, used: set[str] | None = None
) -> _IdTexts:
    """Read a BEIR corpus or queries file.

    With ``used``, a bad row whose id is not in it is only counted (``ignored``): a split need
    not refuse over queries it never asks. Rows without a usable id are always problems, as
    nothing tells whether they are used.
    """
    out = _IdTexts()
    if not path.is_file():
        problems.add(str(path), None, None, "file does not exist")
        return out
    for number, row in json_lines(path, problems):
        doc_id, problem = _row_id(row)
        if doc_id is None:
            assert problem is not None
            problems.reject(str(path), number, *problem)
            continue
        assert isinstance(row, dict)
        if doc_id in out.lines:
            first = out.lines[doc_id]
            problem = ("_id", f"duplicate id {shorten(doc_id)} (first on line {first})")
            text = ""
        else:
            text, problem = _row_text(row, with_title)
        if problem is None:
            out.texts[doc_id] = text
            out.lines[doc_id] = number
            out.refused.pop(doc_id, None)  # a good row after a bad one with the same id
            continue
        if used is not None and doc_id not in used:
            out.ignored += 1
            continue
        problems.reject(str(path), number, *problem)
        if doc_id not in out.lines:
            out.refused.setdefault(doc_id, InputProblem(str(path), number, *problem))
    return out


def relevance_grade(score: str) -> int | None:
    """A qrels score as an integer grade, or None when it is not a whole number.

    BEIR and pytrec_eval take integer grades. ``1.0`` is the grade 1 written as a float and is
    accepted; ``0.7`` is refused rather than truncated to 0, which silently made every such
    judgement "not relevant" (eval printed zeros, train found no rows).
    """
    try:
        return int(score)
    except ValueError:
        pass
    try:
        value = float(score)
    except ValueError:
        return None
    # inf/nan are not whole numbers either (and int() of them would raise something else).
    if not math.isfinite(value) or not value.is_integer():
        return None
    return int(value)


def _grade_problem(score: str) -> str:
    """Why a qrels score is refused; a fraction gets the reason it is not rounded."""
    reason = f"must be an integer, got {shorten(score)}"
    try:
        fraction = math.isfinite(float(score))
    except ValueError:
        fraction = False
    if fraction:
        reason += " (relevance grades are whole numbers: 0, 1, 2, ...; fractions are not rounded)"
    return reason


@dataclass
class _Judgement:
    """One qrels line, parsed; ``problem`` (field, reason) when it cannot be used."""

    line: int
    qid: str = ""
    did: str = ""
    relevance: int = 0
    problem: tuple[str | None, str] | None = None


def _parse_qrels(path: Path, problems: ProblemCollector) -> list[_Judgement]:
    """Every line of a qrels file as a judgement (its problems reported by the caller, in
    line order with the id checks); problems with the whole file are reported here."""
    if not path.is_file():
        available = (
            sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        )
        hint = f" (available splits: {', '.join(available)})" if available else ""
        problems.add(str(path), None, None, f"qrels file does not exist{hint}")
        return []
    judgements: list[_Judgement] = []
    for number, line in text_lines(path, problems):
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue  # header
        if len(parts) not in (3, 4):
            shape = (None, "expected 'query-id<TAB>corpus-id<TAB>score'")
            judgements.append(_Judgement(number, problem=shape))
            continue
        qid, did, score = parts[0].strip(), parts[-2].strip(), parts[-1].strip()
        relevance = relevance_grade(score)
        grade = None if relevance is not None else ("score", _grade_problem(score))
        judgements.append(_Judgement(number, qid, did, relevance or 0, grade))
    return judgements


# Returned for a judgement whose query or document row was refused: without skip_bad_rows
# that row's own problem refuses the input, and repeating it per judgement would only crowd
# the 20 lines shown.
COVERED: tuple[str | None, str, str | None] = ("", "", None)


def _judgement_problem(
    j: _Judgement, corpus: _IdTexts, queries: _IdTexts, skip_bad_rows: bool
) -> tuple[str | None, str, str | None] | None:
    """Why a parsed judgement cannot be used, as (field, reason, the rejected row it follows
    from or None); None when it can be used."""
    if j.problem:
        return (*j.problem, None)
    checks = (
        ("query-id", "query", "query", j.qid, queries, "queries.jsonl"),
        ("corpus-id", "corpus", "document", j.did, corpus, "corpus.jsonl"),
    )
    for field_name, kind, row_kind, key, ids, file in checks:
        if key in ids.texts:
            continue
        if key in ids.refused:
            if not skip_bad_rows:
                return COVERED
            # The report says why this judgement went too, rather than "unknown id".
            row = ids.refused[key]
            where = f"{Path(row.file).name}:{row.line}"
            return (
                field_name,
                f"{row_kind} rejected at {where}: {row.reason()}",
                f"{row.file}:{row.line}",
            )
        return field_name, f"unknown {kind} id {shorten(key)} (not in {file})", None
    return None


def _resolve_qrels(
    path: Path,
    judgements: list[_Judgement],
    corpus: _IdTexts,
    queries: _IdTexts,
    problems: ProblemCollector,
) -> dict[str, dict[str, int]]:
    """The usable judgements by query; the others reported at their lines."""
    qrels: dict[str, dict[str, int]] = {}
    first_seen: dict[tuple[str, str], tuple[int, int]] = {}  # (qid, did) -> (line, relevance)
    for j in judgements:
        if problems.full and not problems.skip_bad_rows:
            problems.truncated = True
            break
        problem = _judgement_problem(j, corpus, queries, problems.skip_bad_rows)
        if problem is COVERED:
            continue
        if problem:
            problems.reject(str(path), j.line, *problem)
            continue
        # A repeated judgement is harmless when it agrees; when it does not, which one is meant?
        first_line, first_relevance = first_seen.setdefault((j.qid, j.did), (j.line, j.relevance))
        if first_relevance != j.relevance:
            problems.reject(
                str(path),
                j.line,
                "score",
                f"{j.relevance} contradicts the judgement of the same pair on line {first_line} "
                f"({first_relevance})",
            )
            continue
        qrels.setdefault(j.qid, {})[j.did] = j.relevance
    return qrels


def load_beir(
    folder: Path,
    split: str,
    problems: ProblemCollector | None = None,
    *,
    skip_bad_rows: bool = False,
) -> BeirDataset:
    """Read a BEIR folder (corpus, queries, qrels of one split), validated.

    Only the queries the split's qrels name are checked: a bad query row of another split is
    counted in ``ignored_bad_rows``, never refused. With ``skip_bad_rows`` (or a ``problems``
    collector made with it, whose setting then decides), bad rows and the judgements that
    depend on them are left out and listed in ``rejected`` instead of refusing.
    """
    if problems is not None and skip_bad_rows and not problems.skip_bad_rows:
        raise ValueError("skip_bad_rows=True with a collector made without it")
    own = problems is None
    problems = problems or ProblemCollector(skip_bad_rows=skip_bad_rows)
    already_rejected = len(problems.rejected)
    folder = Path(folder)
    if not folder.is_dir():
        reason = "is not a folder (BEIR layout expected)" if folder.exists() else None
        problems.add(str(folder), None, None, reason or "data folder does not exist")
        problems.raise_if_any()
    qrels_path = folder / "qrels" / f"{split}.tsv"
    judgements = _parse_qrels(qrels_path, problems)
    corpus = _read_id_texts(folder / "corpus.jsonl", problems, with_title=True)
    used = {j.qid for j in judgements if j.qid}
    queries = _read_id_texts(folder / "queries.jsonl", problems, with_title=False, used=used)
    qrels = _resolve_qrels(qrels_path, judgements, corpus, queries, problems)
    if not problems.problems and not qrels:
        dropped = sum(1 for p in problems.rejected[already_rejected:] if p.file == str(qrels_path))
        left = f" left ({dropped} lines rejected)" if dropped else ""
        problems.add(str(qrels_path), None, None, f"has no judgements{left}")
    if own:
        problems.raise_if_any()
    return BeirDataset(
        corpus=corpus.texts,
        queries=queries.texts,
        qrels=qrels,
        rejected=problems.rejected[already_rejected:],
        ignored_bad_rows=queries.ignored,
    )


def write_beir(folder: Path, data: BeirDataset, split: str) -> None:
    """Write ``data`` as a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) that
    :func:`load_beir` reads back as the same texts and judgements.

    An id qrels cannot hold (a tab, a line break, or surrounding spaces, which its reader strips)
    is a ValueError: written anyway, the judgement would point at no passage.
    """
    ids = [*data.corpus, *data.queries]
    if bad := next((i for i in ids if i != i.strip() or any(c in i for c in "\t\r\n")), None):
        raise ValueError(f"id {shorten(bad)} cannot be written to a BEIR qrels file")

    def lines(rows: Iterable[dict]) -> str:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    corpus = lines({"_id": i, "text": text} for i, text in data.corpus.items())
    queries = lines({"_id": i, "text": text} for i, text in data.queries.items())
    judged = [f"{q}\t{d}\t{grade}\n" for q, docs in data.qrels.items() for d, grade in docs.items()]
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(judged)
    for name, text in (
        ("corpus.jsonl", corpus),
        ("queries.jsonl", queries),
        (f"qrels/{split}.tsv", qrels),
    ):
        atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def beir_training_records(data: BeirDataset, folder: Path, split: str) -> list[Record]:
    """One row per query with its relevant (score > 0) documents as positives and no negatives."""
    records = []
    for qid, judged in data.qrels.items():
        relevant = [did for did, rel in judged.items() if rel > 0]
        if not relevant:
            continue
        records.append(
            Record(
                query=data.queries[qid],
                pos=[data.corpus[did] for did in relevant],
                source=f"{folder}/qrels/{split}.tsv query {qid}",
                query_id=qid,
                pos_ids=relevant,
                neg_ids=[],
            )
        )
    return records


def training_files(path: Path) -> list[Path]:
    """The .json/.jsonl files a --train-data entry names (a file, or every one in a folder).

    Anything but a folder is read as a file, whatever its name: /dev/null, a pipe such as
    bash's ``<(zcat train.jsonl.gz)`` (/dev/fd/N, read once), a named FIFO.
    """
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TRAIN_SUFFIXES)


@dataclass
class TrainingData:
    """Validated training rows plus, for BEIR input, the corpus (a pool for negative filling)."""

    records: list[Record]
    corpus: dict[str, str] = field(default_factory=dict)  # doc id -> text
    # With skip_bad_rows: every problem of a row left out, in reading order (write them with
    # write_rejected_rows; rejected_row_count says how many rows they are).
    rejected: list[InputProblem] = field(default_factory=list)
    # Bad BEIR query rows whose ids the split does not use: neither read nor refused.
    ignored_bad_rows: int = 0


def load_training_data(
    paths: list[Path | str], split: str = "train", *, skip_bad_rows: bool = False
) -> TrainingData:
    """Read every --train-data entry (files, jsonl folders, BEIR folders), all validated first.

    By default any bad row refuses the whole input (InputError, up to 20 problems). With
    ``skip_bad_rows`` bad rows are left out and listed in ``rejected``; problems with a whole
    file (missing, unreadable, empty, UTF-16) and finding no row at all still refuse.
    """
    problems = ProblemCollector(skip_bad_rows=skip_bad_rows)
    records: list[Record] = []
    corpus: dict[str, str] = {}
    ignored = 0
    if not paths:
        problems.add("--train-data", None, None, "no training data given")
    for entry in map(Path, paths):
        if not entry.exists():
            problems.add(str(entry), None, None, "file or folder does not exist")
        elif is_beir_dir(entry):
            beir = load_beir(entry, split, problems)
            records.extend(beir_training_records(beir, entry, split))
            corpus.update(beir.corpus)
            ignored += beir.ignored_bad_rows
        else:
            files = training_files(entry)
            if not files:
                problems.add(
                    str(entry),
                    None,
                    None,
                    "folder has no .json/.jsonl files and is not BEIR layout",
                )
            records.extend(read_flag_jsonl(files, problems))
    refuse_no_rows(problems, paths, found=bool(records))
    problems.raise_if_any()
    return TrainingData(records, corpus, problems.rejected, ignored)


def refuse_no_rows(problems: ProblemCollector, paths: Sequence[Path | str], found: bool) -> None:
    """Input that held no usable row at all is a problem (saying how many bad rows were left
    out), unless a problem is already recorded: that one explains the emptiness."""
    if problems.problems or found:
        return
    left_out = f" ({rejected_row_count(problems.rejected)} bad rows left out)"
    problems.add(
        ", ".join(map(str, paths)),
        None,
        None,
        "no training rows found" + (left_out if problems.rejected else ""),
    )


def rejected_row_count(rejected: list[InputProblem]) -> int:
    """How many rows were left out for problems of their own (a row can have several).

    Judgements dropped only because their query or document was rejected (``follows``) are
    listed in the report but not counted again.
    """
    return len({(p.file, p.line) for p in rejected if p.follows is None})


def write_rejected_rows(path: str | Path, rejected: list[InputProblem]) -> None:
    """Write the left-out rows' problems as jsonl, atomically: one ``{"file", "line", "field",
    "reason"}`` object per problem, in reading order (an empty file when there are none)."""
    text = "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in rejected)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


__all__ = [
    "BeirDataset",
    "foreign_encoding",
    "InputError",
    "Record",
    "TrainingData",
    "beir_training_records",
    "flag_rows",
    "is_beir_dir",
    "load_beir",
    "load_training_data",
    "read_flag_jsonl",
    "rejected_row_count",
    "write_rejected_rows",
]
