"""Training-data readers: every kind of bad input gives one precise `file:line: field` line."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from embtune.cli import main
from embtune.data.formats import load_beir, load_training_data
from embtune.errors import MAX_PROBLEMS, InputError
from tests.conftest import FLAG_DIR, SCIFACT

STOPPED = f"(stopped after {MAX_PROBLEMS} problems; fix these and run again)"
GOOD = {"query": "q", "pos": ["p"]}


def write_lines(path: Path, *lines: object) -> Path:
    """One line per item: dicts as JSON, strings as written."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def problems(*paths: Path | str, split: str = "train") -> list[str]:
    """The lines an InputError reports for these --train-data entries."""
    with pytest.raises(InputError) as info:
        load_training_data(list(paths), split)
    return info.value.lines()


def only_problem(tmp_path: Path, *lines: object) -> str:
    path = write_lines(tmp_path / "train.jsonl", *lines)
    found = problems(path)
    assert len(found) == 1, found
    return found[0].removeprefix(f"{path}:")


# --- good input -------------------------------------------------------------------------------


def test_a_valid_row_keeps_every_field_and_ignores_unknown_keys(tmp_path: Path) -> None:
    row = {
        "query": "what is a cell",
        "pos": ["a cell is", "cells are"],
        "neg": ["a dog"],
        "pos_scores": [1, 0.5],
        "neg_scores": [0.1],
        "prompt": "Represent: ",
        "type": "normal",
    }
    path = write_lines(tmp_path / "train.jsonl", row, GOOD)
    data = load_training_data([path])
    first, second = data.records
    assert (first.query, first.pos, first.neg) == (
        "what is a cell",
        ["a cell is", "cells are"],
        ["a dog"],
    )
    assert (first.pos_scores, first.neg_scores, first.prompt) == ([1, 0.5], [0.1], "Represent: ")
    assert first.source == f"{path}:1"
    assert (second.neg, second.prompt, second.source) == ([], None, f"{path}:2")
    assert data.corpus == {}


def test_an_empty_neg_list_is_allowed(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", {"query": "q", "pos": ["p"], "neg": []})
    assert load_training_data([path]).records[0].neg == []


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_training_data([path]).records[0].query == "q"


def test_windows_line_endings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"query": "a", "pos": ["p"]}\r\n{"query": "b", "pos": ["p"]}\r\n')
    assert [r.query for r in load_training_data([path]).records] == ["a", "b"]


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"], ids=["cr", "lf", "crlf"])
def test_every_line_ending_ends_a_line(tmp_path: Path, end: str) -> None:
    # CR-only files (old Mac tools) were one line: "malformed JSON: Extra data".
    path = tmp_path / "train.jsonl"
    rows = [json.dumps({"query": f"q{i}", "pos": ["p"]}) for i in range(3)]
    path.write_bytes((end.join(rows) + end).encode())
    assert [(r.query, r.source) for r in load_training_data([path]).records] == [
        (f"q{i}", f"{path}:{i + 1}") for i in range(3)
    ]


def test_mixed_line_endings_count_lines_as_an_editor_does(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\r" + good + b"\r\n\r\n" + good + b"\n" + b'{"query": "q"}\r')
    assert problems(path) == [f"{path}:5: field 'pos': missing"]


def test_blank_lines_are_skipped_but_still_counted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", GOOD, "", "   ", {"pos": ["p"]})
    assert problems(path) == [f"{path}:4: field 'query': missing"]


def test_a_folder_reads_every_json_and_jsonl_file_in_name_order(tmp_path: Path) -> None:
    write_lines(tmp_path / "b.jsonl", {"query": "b", "pos": ["p"]})
    write_lines(tmp_path / "a.json", {"query": "a", "pos": ["p"]})
    write_lines(tmp_path / "notes.txt", "not data")
    records = load_training_data([tmp_path]).records
    assert [r.query for r in records] == ["a", "b"]


# --- one test per kind of bad input -----------------------------------------------------------


def test_malformed_json(tmp_path: Path) -> None:
    line = only_problem(tmp_path, GOOD, '{"query": "q", "pos": ["p"]')
    assert line.startswith("2: malformed JSON: ")


def test_a_row_that_is_not_an_object(tmp_path: Path) -> None:
    assert only_problem(tmp_path, '["q", ["p"]]') == "1: expected a JSON object, got list"


def test_missing_query(tmp_path: Path) -> None:
    assert only_problem(tmp_path, {"pos": ["p"]}) == "1: field 'query': missing"


def test_missing_pos(tmp_path: Path) -> None:
    assert only_problem(tmp_path, {"query": "q", "neg": ["n"]}) == "1: field 'pos': missing"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"query": 7, "pos": ["p"]}, "field 'query': must be a string, got int"),
        ({"query": "q", "pos": "p"}, "field 'pos': must be a list of strings, got str"),
        (
            {"query": "q", "pos": ["p"], "neg": ["n", 3]},
            "field 'neg': item 1 must be a string, got int",
        ),
        (
            {"query": "q", "pos": ["p"], "neg": "n"},
            "field 'neg': must be a list of strings, got str",
        ),
        ({"query": "q", "pos": ["p"], "prompt": 1}, "field 'prompt': must be a string, got int"),
    ],
    ids=["query-int", "pos-string", "neg-item-int", "neg-string", "prompt-int"],
)
def test_wrong_types(tmp_path: Path, row: dict, expected: str) -> None:
    assert only_problem(tmp_path, row) == f"1: {expected}"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"query": "", "pos": ["p"]}, "field 'query': must not be empty or whitespace"),
        ({"query": " \t", "pos": ["p"]}, "field 'query': must not be empty or whitespace"),
        ({"query": "q", "pos": ["p", "  "]}, "field 'pos': item 1 must not be empty or whitespace"),
        (
            {"query": "q", "pos": ["p"], "neg": [""]},
            "field 'neg': item 0 must not be empty or whitespace",
        ),
    ],
    ids=["query-empty", "query-whitespace", "pos-item-blank", "neg-item-empty"],
)
def test_empty_or_whitespace_texts(tmp_path: Path, row: dict, expected: str) -> None:
    assert only_problem(tmp_path, row) == f"1: {expected}"


INVISIBLE = {
    "zero-width-space": "\u200b",
    "byte-order-mark": "\ufeff",
    "zero-width-non-joiner": "\u200c",
    "zero-width-joiner": "\u200d",
    "word-joiner": "\u2060",
    "mixed-with-whitespace": " \u200b\t\u3000\u00a0\u2060 ",
    "hangul-filler": "\u3164",
    "variation-selector": "\ufe0f",
}


@pytest.mark.parametrize("text", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_a_text_of_invisible_characters_is_refused_like_an_empty_one(
    tmp_path: Path, text: str
) -> None:
    found = only_problem(tmp_path, {"query": "q", "pos": ["p", text]})
    shown = sorted(f"U+{ord(c):04X}" for c in set(text) if not c.isspace())
    assert found == (
        "1: field 'pos': item 1 must not be empty or whitespace "
        f"(it holds only invisible characters: {', '.join(shown)})"
    )


def test_invisible_characters_around_a_visible_one_are_fine(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", {"query": "\u200bq\u200d", "pos": ["\ufeffp"]})
    assert load_training_data([path]).records[0].query == "\u200bq\u200d"


def test_a_beir_text_of_invisible_characters_is_refused(tmp_path: Path) -> None:
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    write_lines(
        folder / "corpus.jsonl",
        {"_id": "d1", "title": "T1", "text": "one"},
        {"_id": "d2", "title": "\u200b", "text": "\u2060"},
    )
    assert problems(folder) == [
        f"{folder / 'corpus.jsonl'}:2: field 'text': must not be empty or whitespace "
        "(it holds only invisible characters: U+200B, U+2060)"
    ]


def test_empty_pos_list(tmp_path: Path) -> None:
    row = {"query": "q", "pos": []}
    assert only_problem(tmp_path, row) == "1: field 'pos': must not be an empty list"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"query": "q", "pos": ["a", "b"], "pos_scores": [1.0]},
            "field 'pos_scores': has 1 scores but 'pos' has 2 texts",
        ),
        (
            {"query": "q", "pos": ["a"], "neg": ["n"], "neg_scores": [0.1, 0.2]},
            "field 'neg_scores': has 2 scores but 'neg' has 1 texts",
        ),
        (
            {"query": "q", "pos": ["a"], "pos_scores": [True]},
            "field 'pos_scores': item 0 must be a number, got bool",
        ),
        (
            {"query": "q", "pos": ["a"], "pos_scores": 1.0},
            "field 'pos_scores': must be a list of numbers, got float",
        ),
    ],
    ids=["pos-scores-short", "neg-scores-long", "score-bool", "scores-not-list"],
)
def test_scores_must_match_their_texts(tmp_path: Path, row: dict, expected: str) -> None:
    assert only_problem(tmp_path, row) == f"1: {expected}"


def test_nan_in_scores_is_rejected(tmp_path: Path) -> None:
    line = '{"query": "q", "pos": ["a"], "pos_scores": [NaN]}'
    assert only_problem(tmp_path, line) == "1: field 'pos_scores': item 0 is not a finite number"


def test_an_overflowing_score_is_not_finite(tmp_path: Path) -> None:
    line = '{"query": "q", "pos": ["a"], "neg": ["n"], "neg_scores": [1e999]}'
    assert only_problem(tmp_path, line) == "1: field 'neg_scores': item 0 is not a finite number"


def test_an_integer_score_too_large_for_a_float_is_not_finite(tmp_path: Path) -> None:
    line = json.dumps({"query": "q", "pos": ["a"], "pos_scores": [10**400]})
    assert only_problem(tmp_path, line) == "1: field 'pos_scores': item 0 is not a finite number"


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"query": "caf\xe9", "pos": ["p"]}\n')
    assert problems(path) == [f"{path}:2: not valid UTF-8 (byte 14)"]


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n")
    assert problems(path) == [f"{path}: file is empty"]


def test_a_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert problems(missing) == [f"{missing}: file or folder does not exist"]


def test_dev_null_is_an_empty_input_not_a_folder() -> None:
    # /dev/null is not a regular file; it was once listed as a folder (NotADirectoryError).
    assert problems("/dev/null") == ["/dev/null: no training rows found"]


def _pipe_with(data: bytes) -> tuple[str, threading.Thread]:
    """A /dev/fd/N path reading ``data`` from a pipe, as bash's ``<(cat file)`` gives."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as fh:
            fh.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    return f"/dev/fd/{read_end}", writer


def test_a_pipe_is_read_as_a_file_once() -> None:
    rows = b"".join(json.dumps({"query": f"q{i}", "pos": ["p"]}).encode() + b"\n" for i in range(3))
    rows *= 30_000  # more than a pipe buffer holds, so the reader must drain it as it goes
    path, writer = _pipe_with(rows)
    try:
        records = load_training_data([path]).records
    finally:
        writer.join()
        os.close(int(path.rsplit("/", 1)[1]))
    assert len(records) == 90_000
    assert records[-1].source == f"{path}:90000"


def test_bad_rows_in_a_pipe_are_named_by_its_path() -> None:
    path, writer = _pipe_with(b'{"query": "q", "pos": ["p"]}\n{"query": ""}\n')
    try:
        found = problems(path)
    finally:
        writer.join()
        os.close(int(path.rsplit("/", 1)[1]))
    assert found == [
        f"{path}:2: field 'pos': missing",
        f"{path}:2: field 'query': must not be empty or whitespace",
    ]


def test_a_named_fifo_is_read_as_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "train.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as fh:
            fh.write(json.dumps(GOOD).encode() + b"\n")

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert [r.query for r in load_training_data([fifo]).records] == ["q"]
    finally:
        writer.join()


def test_a_folder_without_jsonl_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    assert problems(tmp_path) == [
        f"{tmp_path}: folder has no .json/.jsonl files and is not BEIR layout"
    ]


def test_no_training_data_at_all() -> None:
    assert problems() == ["--train-data: no training data given"]


def test_more_than_twenty_problems_stop_at_twenty(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", *[{"query": "q"}] * 30)
    found = problems(path)
    assert found[:-1] == [f"{path}:{n}: field 'pos': missing" for n in range(1, 21)]
    assert found[-1] == STOPPED


def test_exactly_twenty_problems_are_not_called_truncated(tmp_path: Path) -> None:
    # The file ends with a newline, as files do: nothing is left unchecked after line 20.
    path = write_lines(tmp_path / "train.jsonl", *[{"query": "q"}] * 20)
    found = problems(path)
    assert len(found) == 20 and STOPPED not in found


def test_every_problem_of_a_file_is_reported_in_one_pass(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "train.jsonl",
        {"query": 1, "pos": "p"},
        GOOD,
        "{oops",
        {"query": "q", "pos": ["p"], "neg": [None]},
    )
    found = problems(path)
    assert found[0] == f"{path}:1: field 'query': must be a string, got int"
    assert found[1] == f"{path}:1: field 'pos': must be a list of strings, got str"
    assert found[2].startswith(f"{path}:3: malformed JSON: ")
    assert found[3] == f"{path}:4: field 'neg': item 0 must be a string, got NoneType"
    assert len(found) == 4


def test_problems_in_several_files_are_reported_together(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", {"pos": ["p"]})
    b = write_lines(tmp_path / "b.jsonl", {"query": "q"})
    missing = tmp_path / "c.jsonl"
    assert problems(a, b, missing) == [
        f"{a}:1: field 'query': missing",
        f"{b}:1: field 'pos': missing",
        f"{missing}: file or folder does not exist",
    ]


# --- the same through the command line -------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"pos": ["p"]}, "1: field 'query': missing"),
        ({"query": "q", "pos": "p"}, "1: field 'pos': must be a list of strings, got str"),
        ({"query": "q", "pos": []}, "1: field 'pos': must not be an empty list"),
        (
            {"query": "q", "pos": ["a"], "pos_scores": []},
            "1: field 'pos_scores': has 0 scores but 'pos' has 1 texts",
        ),
    ],
    ids=["missing-query", "pos-string", "empty-pos", "scores-length"],
)
def test_cli_reports_bad_data_with_exit_2_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: dict, expected: str
) -> None:
    path = write_lines(tmp_path / "train.jsonl", line)
    out = tmp_path / "out"
    status = main(["train", "--model", "never-loaded", "--train-data", str(path), "-o", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines() == [f"embtune train: error: {path}:{expected}"]
    assert "Traceback" not in err
    assert not out.exists()  # data is checked before any folder is written


def test_cli_reports_twenty_problems_and_the_stop_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "train.jsonl", *["{bad"] * 25)
    argv = ["train", "--model", "m", "--train-data", str(path), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 21
    assert all(x.startswith(f"embtune train: error: {path}:") for x in lines[:20])
    assert lines[20] == f"embtune train: error: {STOPPED}"


def test_cli_reports_a_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    argv = ["train", "--model", "m", "--train-data", str(missing), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune train: error: {missing}: file or folder does not exist"
    ]


# --- one JSON array per file (.json) ----------------------------------------------------------


def test_a_json_array_file_is_read_row_by_row(tmp_path: Path) -> None:
    # FlagEmbedding loads such files (datasets' json builder); they once gave "expected a JSON
    # object, got list".
    path = tmp_path / "train.json"
    rows = [{"query": f"q{i}", "pos": ["p"], "neg": ["n"]} for i in range(3)]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    records = load_training_data([path]).records
    assert [(r.query, r.neg) for r in records] == [(f"q{i}", ["n"]) for i in range(3)]
    # Each row points at the line its element starts on.
    assert [r.source for r in records] == [f"{path}:{n}" for n in (2, 11, 20)]


def test_a_bad_element_of_a_json_array_is_named_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    rows = [GOOD, {"query": "q"}, GOOD, 7]
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert problems(path) == [
        f"{path}:8: field 'pos': missing",
        f"{path}:17: expected a JSON object, got int",
    ]


def test_a_one_line_json_array_names_the_element(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, GOOD, {"query": "", "pos": ["p"]}]), encoding="utf-8")
    assert problems(path) == [
        f"{path}:1: field 'query': must not be empty or whitespace (array element 2)"
    ]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_malformed_json_in_an_array_file_is_named_at_its_line(tmp_path: Path, end: str) -> None:
    path = tmp_path / "train.json"
    text = json.dumps([GOOD, GOOD], indent=1).replace("\n", end)
    head, tail = text.rsplit('"q"', 1)
    path.write_bytes(f'{head}"q" "x"{tail}'.encode())  # line 9: '  "query": "q" "x",'
    assert problems(path) == [f"{path}:9: malformed JSON: Expecting ',' delimiter: column 16"]


def test_a_json_array_file_with_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    text = json.dumps([GOOD, {"query": "caf\u00e9", "pos": ["p"]}], indent=1, ensure_ascii=False)
    path.write_bytes(text.encode("utf-8").replace("é".encode(), b"\xe9"))
    assert problems(path) == [f"{path}:9: not valid UTF-8 (byte 15)"]  # '  "query": "caf\xe9


def test_an_empty_json_array_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("[\n]\n", encoding="utf-8")
    assert problems(path) == [f"{path}: no training rows found"]


def test_a_jsonl_file_holding_an_array_of_rows_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps([GOOD, GOOD]) + "\n", encoding="utf-8")
    assert len(load_training_data([path]).records) == 2


# --- FlagEmbedding's own example files ------------------------------------------------------

FLAG_TRAINING_FILES = sorted(FLAG_DIR.glob("*.jsonl"))


def test_the_flagembedding_examples_are_there() -> None:
    assert len(FLAG_TRAINING_FILES) == 7


@pytest.mark.parametrize("path", FLAG_TRAINING_FILES, ids=lambda p: p.stem)
def test_flagembedding_training_files_read_unchanged(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    records = load_training_data([path]).records
    assert len(records) == len(rows) == 10
    for row, rec in zip(rows, records, strict=True):
        assert (rec.query, rec.pos, rec.neg) == (row["query"], row["pos"], row.get("neg", []))
        assert rec.prompt == row.get("prompt")
        assert rec.pos_scores == row.get("pos_scores")


def test_flagembedding_evaluation_files_are_not_training_data() -> None:
    corpus = FLAG_DIR / "research_old-examples_finetune_toy_evaluation_data_toy_corpus.json"
    query = FLAG_DIR / "research_old-examples_finetune_toy_evaluation_data_toy_query.json"
    assert problems(query) == [f"{query}:{n}: field 'pos': missing" for n in (1, 2, 3)]
    assert problems(corpus) == [
        f"{corpus}:{n}: field '{name}': missing" for n in range(1, 6) for name in ("query", "pos")
    ]


@pytest.mark.parametrize("path", FLAG_TRAINING_FILES, ids=lambda p: p.stem)
def test_flagembedding_files_saved_as_a_json_array_read_the_same(path: Path, tmp_path) -> None:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    as_array = tmp_path / f"{path.stem}.json"
    as_array.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    expected = load_training_data([path]).records
    found = load_training_data([as_array]).records
    assert [(r.query, r.pos, r.neg, r.pos_scores, r.neg_scores, r.prompt) for r in found] == [
        (r.query, r.pos, r.neg, r.pos_scores, r.neg_scores, r.prompt) for r in expected
    ]


def test_the_whole_flagembedding_folder_fails_only_on_the_evaluation_files() -> None:
    found = problems(FLAG_DIR)
    assert len(found) == 13
    assert all("toy_evaluation_data" in line for line in found)


# --- BEIR layout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scifact_train():
    return load_training_data([SCIFACT], "train")


def test_scifact_train_split_becomes_one_row_per_query(scifact_train) -> None:
    records = scifact_train.records
    assert len(records) == 809
    assert sum(len(r.pos) for r in records) == 919
    assert len(scifact_train.corpus) == 5183
    assert all(r.neg == [] and len(r.pos) == len(r.pos_ids) for r in records)


def test_scifact_texts_are_title_space_text(scifact_train) -> None:
    first = scifact_train.records[0]
    assert first.query_id == "0" and first.pos_ids == ["31715818"]
    queries = {}
    with (SCIFACT / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as f:
        doc = next(d for d in map(json.loads, f) if d["_id"] == "31715818")
    assert first.query == queries["0"]
    assert first.pos == [doc["title"] + " " + doc["text"]]


def beir_folder(root: Path, qrels: str, split: str = "train") -> Path:
    write_lines(
        root / "corpus.jsonl",
        {"_id": "d1", "title": "T1", "text": "one"},
        {"_id": "d2", "title": "", "text": "two"},
        {"_id": "d3", "text": "three"},
    )
    write_lines(
        root / "queries.jsonl", {"_id": "q1", "text": "first?"}, {"_id": 2, "text": "second?"}
    )
    (root / "qrels").mkdir()
    (root / "qrels" / f"{split}.tsv").write_text(qrels, encoding="utf-8")
    return root


def test_beir_rows_hold_relevant_documents_only(tmp_path: Path) -> None:
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n2\td3\t2\n")
    data = load_training_data([folder])
    assert [(r.query, r.pos, r.pos_ids) for r in data.records] == [
        ("first?", ["T1 one"], ["d1"]),
        ("second?", ["three"], ["d3"]),
    ]
    assert list(data.corpus.values()) == ["T1 one", "two", "three"]


def test_beir_unknown_corpus_id_in_qrels(tmp_path: Path) -> None:
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    qrels = folder / "qrels" / "train.tsv"
    assert problems(folder) == [
        f"{qrels}:3: field 'corpus-id': unknown corpus id 'd9' (not in corpus.jsonl)"
    ]


def test_beir_unknown_query_id_in_qrels(tmp_path: Path) -> None:
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    qrels = folder / "qrels" / "train.tsv"
    assert problems(folder) == [
        f"{qrels}:2: field 'query-id': unknown query id 'q7' (not in queries.jsonl)"
    ]


def test_beir_missing_split_names_the_available_ones(tmp_path: Path) -> None:
    folder = beir_folder(tmp_path, "q1\td1\t1\n", split="test")
    (folder / "qrels" / "dev.tsv").write_text("q1\td2\t1\n")
    assert problems(folder, split="train") == [
        f"{folder}/qrels/train.tsv: qrels file does not exist (available splits: dev, test)"
    ]


def test_scifact_missing_split_names_train_and_test() -> None:
    with pytest.raises(InputError) as info:
        load_beir(SCIFACT, "validation")
    assert info.value.lines() == [
        f"{SCIFACT}/qrels/validation.tsv: qrels file does not exist (available splits: test, train)"
    ]


def test_beir_whitespace_id_is_named_not_a_crash(tmp_path: Path) -> None:
    # Found by the byte-mutation fuzzer: a blank _id once raised UnboundLocalError.
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    write_lines(
        folder / "queries.jsonl", {"_id": "q1", "text": "first?"}, {"_id": " ", "text": "x"}
    )
    with pytest.raises(InputError) as info:
        load_training_data([folder])
    assert info.value.lines() == [
        f"{folder / 'queries.jsonl'}:2: field '_id': must not be empty or whitespace"
    ]


@pytest.mark.parametrize("score", ["0.7", "1.5", "-0.25", "2e-1"])
def test_beir_fractional_grade_is_refused_not_truncated(tmp_path: Path, score: str) -> None:
    # int(float("0.7")) == 0 once made every such judgement "not relevant" without a word.
    folder = beir_folder(tmp_path, f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{score}\n")
    qrels = folder / "qrels" / "train.tsv"
    (line,) = problems(folder)
    assert line.startswith(f"{qrels}:3: field 'score': must be an integer, got '{score}' (")
    with pytest.raises(InputError):
        load_beir(folder, "train")


def test_beir_whole_number_grades_written_as_floats_are_read(tmp_path: Path) -> None:
    folder = beir_folder(
        tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1.0\nq1\td2\t0.0\n2\td3\t2\n"
    )
    assert load_beir(folder, "train").qrels == {"q1": {"d1": 1, "d2": 0}, "2": {"d3": 2}}
