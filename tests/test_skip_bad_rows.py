"""skip_bad_rows: bad rows are left out and listed instead of refusing; the default refuses.

Also: a BEIR split refuses only over rows it uses (cmrc2018's two empty queries belong to its
train split, so its test split loads as it is).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtune.data.formats import (
    load_beir,
    load_training_data,
    read_flag_jsonl,
    rejected_row_count,
    write_rejected_rows,
)
from embtune.errors import MAX_PROBLEMS, InputError, InputProblem, ProblemCollector
from tests.conftest import SHARED_DATA

CMRC = SHARED_DATA / "cmrc2018"
GOOD = {"query": "what is a cell", "pos": ["A cell is the unit of life."]}
EMPTY_QUERIES = [748, 809]  # cmrc2018/queries.jsonl: TRIAL_776_QUERY_4, TRIAL_20_QUERY_0
EMPTY = "field 'text': must not be empty or whitespace"


def refusal(*args, **kwargs) -> list[str]:
    with pytest.raises(InputError) as info:
        load_training_data(*args, **kwargs)
    return info.value.lines()


# --- cmrc2018: the real data with two empty queries --------------------------------------------


def test_cmrc_test_split_loads_although_another_split_has_empty_queries() -> None:
    data = load_beir(CMRC, "test")
    assert len(data.qrels) == 3219
    assert data.rejected == []
    assert data.ignored_bad_rows == 2  # the two empty queries, which only train uses
    assert len(load_training_data([CMRC], "test").records) == 3219


def test_cmrc_train_split_refuses_naming_both_empty_queries() -> None:
    with pytest.raises(InputError) as info:
        load_beir(CMRC, "train")
    assert info.value.lines() == [f"{CMRC}/queries.jsonl:{n}: {EMPTY}" for n in EMPTY_QUERIES]
    assert refusal([CMRC], "train") == info.value.lines()


def test_cmrc_train_split_with_skip_bad_rows_leaves_the_two_queries_out() -> None:
    data = load_beir(CMRC, "train", skip_bad_rows=True)
    assert rejected_row_count(data.rejected) == 2
    assert [str(p) for p in data.rejected] == [
        *(f"{CMRC}/queries.jsonl:{n}: {EMPTY}" for n in EMPTY_QUERIES),
        # The judgements of a rejected query say why they went, not "unknown query id".
        f"{CMRC}/qrels/train.tsv:749: field 'query-id': query rejected at queries.jsonl:748: "
        + EMPTY,
        f"{CMRC}/qrels/train.tsv:810: field 'query-id': query rejected at queries.jsonl:809: "
        + EMPTY,
    ]
    assert [p.follows for p in data.rejected] == [
        None,
        None,
        f"{CMRC}/queries.jsonl:748",
        f"{CMRC}/queries.jsonl:809",
    ]
    assert len(data.qrels) == 1000 and "TRIAL_20_QUERY_0" not in data.qrels
    training = load_training_data([CMRC], "train", skip_bad_rows=True)
    assert len(training.records) == 1000
    assert training.rejected == data.rejected


# --- FlagEmbedding jsonl -----------------------------------------------------------------------


def messy_file(path: Path) -> Path:
    lines = [
        json.dumps(GOOD).encode(),
        b'{"query": "truncated", "pos": ["a"',
        json.dumps({"query": "q"}).encode(),
        json.dumps({"query": "\u200b", "pos": [], "neg": [3]}).encode(),
        b'{"query": "caf\xe9", "pos": ["p"]}',
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),
        json.dumps({**GOOD, "query": "last"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_refuse_by_default(tmp_path: Path) -> None:
    path = messy_file(tmp_path / "train.jsonl")
    assert len(refusal([path])) == 7


def test_bad_rows_are_left_out_and_listed_with_skip_bad_rows(tmp_path: Path) -> None:
    path = messy_file(tmp_path / "train.jsonl")
    data = load_training_data([path], skip_bad_rows=True)
    assert [(r.query, r.source) for r in data.records] == [
        ("what is a cell", f"{path}:1"),
        ("last", f"{path}:7"),
    ]
    assert [(p.line, p.field) for p in data.rejected] == [
        (2, None),
        (3, "pos"),
        (4, "query"),
        (4, "pos"),
        (4, "neg"),
        (5, None),
        (6, None),
    ]
    assert rejected_row_count(data.rejected) == 5
    assert data.rejected[0].message.startswith("malformed JSON: Expecting")
    assert data.rejected[5].message == "not valid UTF-8 (byte 14)"
    assert data.rejected[6].message == "byte-order mark inside the file (files concatenated?)"


def test_skip_bad_rows_keeps_every_problem_not_only_twenty(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [GOOD] + [{"query": f"q{i}"} for i in range(50)]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    data = load_training_data([path], skip_bad_rows=True)
    assert len(data.records) == 1 and rejected_row_count(data.rejected) == 50
    found = refusal([path])  # the default keeps its limit
    assert len(found) == MAX_PROBLEMS + 1 and found[-1].startswith("(stopped after 20")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "file is empty"),
        ("\ufeff".encode("utf-16-le") + b"{\x00", "file is UTF-16; save it as UTF-8"),
        (b'[{"query": "q", "pos": ["p"]},\n{"query": ', "malformed JSON: Expecting value"),
    ],
    ids=["empty", "utf16", "broken-json-array"],
)
def test_problems_of_a_whole_file_still_refuse(tmp_path: Path, content: bytes, expected) -> None:
    path = tmp_path / "train.json"
    path.write_bytes(content)
    (line,) = refusal([path], skip_bad_rows=True)
    assert line.split(": ", 1)[1].startswith(expected), line


def test_a_missing_file_still_refuses(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert refusal([missing], skip_bad_rows=True) == [f"{missing}: file or folder does not exist"]


def test_nothing_left_is_no_training_rows_and_says_what_was_left_out(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": ""}\n{"pos": ["p"]}\n', encoding="utf-8")
    assert refusal([path], skip_bad_rows=True) == [
        f"{path}: no training rows found (2 bad rows left out)"
    ]


def test_read_flag_jsonl_returns_the_rejected_rows_with_the_records(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"query": 1, "pos": ["p"]}\n', encoding="utf-8")
    records = read_flag_jsonl([path], skip_bad_rows=True)
    assert [r.query for r in records] == ["what is a cell"]
    assert records.rejected == [InputProblem(str(path), 2, "query", "must be a string, got int")]
    with pytest.raises(InputError):
        read_flag_jsonl([path])
    with pytest.raises(ValueError):  # a collector decides for itself; a contradiction is a bug
        read_flag_jsonl([path], ProblemCollector(), skip_bad_rows=True)


def test_a_bad_element_of_a_json_array_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, {"query": "q"}, GOOD], indent=1), encoding="utf-8")
    data = load_training_data([path], skip_bad_rows=True)
    assert len(data.records) == 2
    assert [str(p) for p in data.rejected] == [f"{path}:8: field 'pos': missing"]


# --- BEIR ----------------------------------------------------------------------------------------


def beir(root: Path, qrels: list[str], queries: list[dict], corpus: list[dict]) -> Path:
    (root / "qrels").mkdir(parents=True)
    lines = ["query-id\tcorpus-id\tscore", *qrels]
    (root / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, rows in (("queries", queries), ("corpus", corpus)):
        text = "\n".join(map(json.dumps, rows)) + "\n"
        (root / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return root


QUERIES = [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}]
CORPUS = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}]


def test_a_rejected_document_is_named_by_the_judgements_that_used_it(tmp_path: Path) -> None:
    corpus = [*CORPUS, {"_id": "d3", "title": "\u2060", "text": ""}]
    folder = beir(tmp_path, ["q1\td1\t1", "q2\td3\t1", "q2\td2\t1"], QUERIES, corpus)
    blank = "field 'text': must not be empty or whitespace (it holds only invisible characters"
    # Refused: the document's own line, not an "unknown corpus id" for each judgement.
    (line,) = refusal([folder])
    assert line.startswith(f"{folder}/corpus.jsonl:3: {blank}")
    data = load_beir(folder, "train", skip_bad_rows=True)
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert str(data.rejected[1]).startswith(
        f"{folder}/qrels/train.tsv:3: field 'corpus-id': document rejected at corpus.jsonl:3: "
        + blank
    )
    assert rejected_row_count(data.rejected) == 1


def test_bad_query_rows_of_other_splits_are_only_counted(tmp_path: Path) -> None:
    queries = [*QUERIES, {"_id": "q3", "text": " "}, {"_id": "q4"}, {"_id": "q1", "text": "x"}]
    folder = beir(tmp_path, ["q2\td1\t1"], queries, CORPUS)
    data = load_beir(folder, "train")
    assert (data.qrels, data.ignored_bad_rows, data.rejected) == ({"q2": {"d1": 1}}, 3, [])
    assert load_training_data([folder]).ignored_bad_rows == 3
    # A row whose id cannot be read might be any query: it still refuses.
    (tmp_path / "queries.jsonl").write_text('{"_id": "q2", "text": "?"}\n{"text": "x"}\n')
    assert refusal([folder]) == [f"{folder}/queries.jsonl:2: field '_id': missing"]


def test_bad_judgements_are_left_out_with_skip_bad_rows(tmp_path: Path) -> None:
    qrels = ["q1\td1\t1", "q1\td1\t0", "q9\td1\t1", "q2\td9\t1", "q2\td2\t0.5", "q2", "q2\td2\t2"]
    folder = beir(tmp_path, qrels, QUERIES, CORPUS)
    assert len(refusal([folder])) == 5
    data = load_beir(folder, "train", skip_bad_rows=True)
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert [(p.line, p.field) for p in data.rejected] == [
        (3, "score"),
        (4, "query-id"),
        (5, "corpus-id"),
        (6, "score"),
        (7, None),
    ]


def test_a_split_whose_judgements_were_all_rejected_refuses(tmp_path: Path) -> None:
    folder = beir(tmp_path, ["q1\td7\t1", "q2\td8\t1"], QUERIES, CORPUS)
    assert refusal([folder], skip_bad_rows=True) == [
        f"{folder}/qrels/train.tsv: has no judgements left (2 lines rejected)"
    ]


# --- the report --------------------------------------------------------------------------------


def test_the_report_is_one_json_object_per_problem(tmp_path: Path) -> None:
    data = load_beir(CMRC, "train", skip_bad_rows=True)
    report = tmp_path / "out" / "rejected_rows.jsonl"
    write_rejected_rows(report, data.rejected)
    lines = [json.loads(x) for x in report.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {
        "file": f"{CMRC}/queries.jsonl",
        "line": 748,
        "field": "text",
        "reason": "must not be empty or whitespace",
    }
    assert lines[2]["follows"] == f"{CMRC}/queries.jsonl:748"
    assert len(lines) == 4
    assert [p.name for p in report.parent.iterdir()] == ["rejected_rows.jsonl"]  # no temp file
    write_rejected_rows(report, [])
    assert report.read_text() == ""


def test_a_failed_report_write_leaves_the_old_report(tmp_path: Path, monkeypatch) -> None:
    report = tmp_path / "rejected_rows.jsonl"
    write_rejected_rows(report, [InputProblem("a.jsonl", 1, None, "x")])
    before = report.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        write_rejected_rows(report, [InputProblem("b.jsonl", 2, None, "y")])
    monkeypatch.undo()
    assert report.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rejected_rows.jsonl"]
