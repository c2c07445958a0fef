"""Readers for training and evaluation data, with validation that names file, line and field.

Two layouts are understood:

* FlagEmbedding jsonl, unchanged: one JSON object per line with ``query`` (str), ``pos``
  (list of str), optional ``neg`` (list of str), ``pos_scores`` / ``neg_scores`` (numbers, same
  lengths as ``pos`` / ``neg``) and ``prompt`` (str, this row's query instruction). Other keys
  (FlagEmbedding's ``type``, for example) are ignored.
* BEIR: a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score`` with a header).
  For training, each query with a relevant document becomes one row whose ``pos`` are those
  documents (text = title + " " + text) and whose ``neg`` is empty.

Every reader validates the whole input before returning and raises :class:`InputError` with up
to 20 problems, so nothing is trained (or written) on half-valid data.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embtune.errors import InputError, ProblemCollector, shorten
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


def _decode_line(path: Path, number: int, line: bytes, problems: ProblemCollector) -> str | None:
    """One line as text, or None after recording why it is not UTF-8."""
    if line.startswith(UTF8_BOM):
        if number == 1:
            line = line[3:]  # a UTF-8 byte-order mark is harmless at the start; accept it
        else:
            problems.add(
                str(path), number, None, "byte-order mark inside the file (files concatenated?)"
            )
            return None
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(str(path), number, None, f"not valid UTF-8 (byte {exc.start})")
        return None


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
            problems.add(str(path), number, None, f"malformed JSON: {exc}")
            continue
        except RecursionError:
            problems.add(str(path), number, None, "malformed JSON: nested too deeply")
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
        # Name every line that is not UTF-8 (the line reader's check), nothing else: reading
        # the rest line by line would report each line of a pretty-printed array as broken.
        for number, line in enumerate(raw.splitlines(), start=1):
            if not problems.full:
                _decode_line(path, number, line, problems)
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


def read_flag_jsonl(paths: list[Path], problems: ProblemCollector | None = None) -> list[Record]:
    """Read FlagEmbedding jsonl files into validated records (raises InputError on problems)."""
    own = problems is None
    problems = problems or ProblemCollector()
    records: list[Record] = []
    for path in paths:
        for number, element, row in json_values(path, problems):
            found = _row_problems(row)
            for name, reason in found:
                where = "" if element is None else f" (array element {element})"
                problems.add(str(path), number, name, reason + where)
            if found:
                continue
            assert isinstance(row, dict)
            records.append(
                Record(
                    query=row["query"],
                    pos=list(row["pos"]),
                    neg=list(row.get("neg") or []),
                    pos_scores=_floats(row.get("pos_scores")),
                    neg_scores=_floats(row.get("neg_scores")),
                    prompt=row.get("prompt"),
                    source=f"{path}:{number}",
                )
            )
    if own:
        problems.raise_if_any()
    return records


def _read_id_texts(
    path: Path, problems: ProblemCollector, with_title: bool
) -> tuple[dict[str, str], dict[str, int]]:
    """Read a BEIR corpus or queries file: {id: text} and {id: line number}."""
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    if not path.is_file():
        problems.add(str(path), None, None, "file does not exist")
        return texts, lines
    for number, row in json_lines(path, problems):
        if not isinstance(row, dict):
            problems.add(
                str(path), number, None, f"expected a JSON object, got {type(row).__name__}"
            )
            continue
        doc_id = row.get("_id")
        if doc_id is None:
            problems.add(str(path), number, "_id", "missing")
            continue
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            problems.add(str(path), number, "_id", f"must be a string, got {type(doc_id).__name__}")
            continue
        doc_id = str(doc_id)
        reason = "must not be empty or whitespace" if not doc_id.strip() else None
        if reason := reason or _surrogate_problem(doc_id):
            problems.add(str(path), number, "_id", reason)
            continue
        if doc_id in lines:
            problems.add(
                str(path),
                number,
                "_id",
                f"duplicate id {shorten(doc_id)} (first on line {lines[doc_id]})",
            )
            continue
        body = row.get("text")
        title = row.get("title", "") if with_title else ""
        if body is None:
            problems.add(str(path), number, "text", "missing")
            continue
        if not isinstance(body, str):
            problems.add(str(path), number, "text", f"must be a string, got {type(body).__name__}")
            continue
        if title is None:
            title = ""
        if not isinstance(title, str):
            problems.add(
                str(path), number, "title", f"must be a string, got {type(title).__name__}"
            )
            continue
        # BEIR's convention (and the MTEB figures we reproduce): title + " " + text.
        text = f"{title} {body}".strip() if title else body.strip()
        if reason := blank_problem(text):
            problems.add(str(path), number, "text", reason)
            continue
        if reason := _surrogate_problem(text):
            where = "title" if _surrogate_problem(title) else "text"
            problems.add(str(path), number, where, reason)
            continue
        texts[doc_id] = text
        lines[doc_id] = number
    return texts, lines


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


def _read_qrels(
    path: Path,
    corpus: dict[str, str],
    queries: dict[str, str],
    problems: ProblemCollector,
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    if not path.is_file():
        available = (
            sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        )
        hint = f" (available splits: {', '.join(available)})" if available else ""
        problems.add(str(path), None, None, f"qrels file does not exist{hint}")
        return qrels
    raw = _read_raw(path, problems)
    if raw is None:
        return qrels
    first_seen: dict[tuple[str, str], tuple[int, int]] = {}  # (qid, did) -> (line, relevance)
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue
        if problems.full:
            problems.truncated = True
            break
        line = _decode_line(path, number, raw_line, problems)
        if line is None:
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue  # header
        if len(parts) not in (3, 4):
            problems.add(str(path), number, None, "expected 'query-id<TAB>corpus-id<TAB>score'")
            continue
        qid, did, score = parts[0].strip(), parts[-2].strip(), parts[-1].strip()
        relevance = relevance_grade(score)
        if relevance is None:
            problems.add(str(path), number, "score", _grade_problem(score))
            continue
        if qid not in queries:
            problems.add(
                str(path),
                number,
                "query-id",
                f"unknown query id {shorten(qid)} (not in queries.jsonl)",
            )
            continue
        if did not in corpus:
            problems.add(
                str(path),
                number,
                "corpus-id",
                f"unknown corpus id {shorten(did)} (not in corpus.jsonl)",
            )
            continue
        # A repeated judgement is harmless when it agrees; when it does not, which one is meant?
        first_line, first_relevance = first_seen.setdefault((qid, did), (number, relevance))
        if first_relevance != relevance:
            problems.add(
                str(path),
                number,
                "score",
                f"{relevance} contradicts the judgement of the same pair on line {first_line} "
                f"({first_relevance})",
            )
            continue
        qrels.setdefault(qid, {})[did] = relevance
    return qrels


def load_beir(folder: Path, split: str, problems: ProblemCollector | None = None) -> BeirDataset:
    """Read a BEIR folder (corpus, queries, qrels of one split), validated."""
    own = problems is None
    problems = problems or ProblemCollector()
    folder = Path(folder)
    if not folder.is_dir():
        reason = "is not a folder (BEIR layout expected)" if folder.exists() else None
        problems.add(str(folder), None, None, reason or "data folder does not exist")
        problems.raise_if_any()
    corpus, _ = _read_id_texts(folder / "corpus.jsonl", problems, with_title=True)
    queries, _ = _read_id_texts(folder / "queries.jsonl", problems, with_title=False)
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv", corpus, queries, problems)
    if not problems.problems and not qrels:
        problems.add(str(folder / "qrels" / f"{split}.tsv"), None, None, "has no judgements")
    if own:
        problems.raise_if_any()
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)


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


def load_training_data(paths: list[Path | str], split: str = "train") -> TrainingData:
    """Read every --train-data entry (files, jsonl folders, BEIR folders), all validated first."""
    problems = ProblemCollector()
    records: list[Record] = []
    corpus: dict[str, str] = {}
    if not paths:
        problems.add("--train-data", None, None, "no training data given")
    for entry in map(Path, paths):
        if not entry.exists():
            problems.add(str(entry), None, None, "file or folder does not exist")
        elif is_beir_dir(entry):
            beir = load_beir(entry, split, problems)
            records.extend(beir_training_records(beir, entry, split))
            corpus.update(beir.corpus)
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
    if not problems.problems and not records:
        problems.add(", ".join(map(str, paths)), None, None, "no training rows found")
    problems.raise_if_any()
    return TrainingData(records=records, corpus=corpus)


__all__ = [
    "BeirDataset",
    "foreign_encoding",
    "InputError",
    "Record",
    "TrainingData",
    "beir_training_records",
    "is_beir_dir",
    "load_beir",
    "load_training_data",
    "read_flag_jsonl",
]
