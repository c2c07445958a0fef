"""Teacher-checked negatives, --drop-teacher-false-negatives, unscored rows under distillation,
and distillation runs end to end (log signals, resume, inspect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtune.checkpoint import KILL_AT_STEP_ENV
from embtune.cli import main
from embtune.data.formats import Record
from embtune.data.teacher_scores import (
    drop_teacher_false_negatives,
    refuse_unscored_rows,
    teacher_check,
)
from embtune.errors import UsageError
from embtune.run_files import LOG_FILE, SUMMARY_FILE
from tests.test_resume import (
    assert_same_as_reference,
    run_in_process,
    run_until_killed,
    train_argv,
)


def _record(line: int, pos_scores, neg_scores, negatives: int = 3) -> Record:
    return Record(
        query=f"query {line}",
        pos=[f"positive {line} {i}" for i in range(len(pos_scores or [0.0]))],
        neg=[f"negative {line} {j}" for j in range(negatives)],
        pos_scores=pos_scores,
        neg_scores=neg_scores,
        source=f"rows.jsonl:{line}",
    )


def test_the_check_flags_negatives_at_or_above_the_lowest_positive() -> None:
    records = [
        _record(1, [0.9, 0.5], [0.5, 0.2, 0.7]),  # 0.5 ties, 0.7 beats the lower positive
        _record(2, [0.9], [0.1, 0.2, 0.3]),
        _record(3, None, None),  # not checked
    ]
    check = teacher_check(records)
    assert check is not None
    assert (check.checked_rows, check.checked_negatives) == (2, 6)
    assert (check.suspects, check.rows_with_suspects) == (2, 1)
    assert [s.negative for s in check.worst] == ["negative 1 2", "negative 1 0"]
    assert check.worst[0].excess == pytest.approx(0.2)
    assert check.worst[0].source == "rows.jsonl:1"
    assert "2 negatives in 1 rows (50%)" in check.findings()[0]
    assert teacher_check([_record(1, None, None)]) is None


def test_the_drop_removes_negatives_above_the_positive_minus_the_margin() -> None:
    records = [_record(1, [0.9], [0.95, 0.85, 0.2]), _record(2, [0.9], [0.1, 0.2, 0.3])]
    kept, drop = drop_teacher_false_negatives(records, margin=0.1)
    assert kept[0].neg == ["negative 1 2"] and kept[0].neg_scores == [0.2]
    assert kept[1] == records[1]
    assert (drop.removed, drop.rows, drop.checked_rows) == (2, 1, 2)
    assert records[0].neg == ["negative 1 0", "negative 1 1", "negative 1 2"]  # not mutated
    kept, drop = drop_teacher_false_negatives(records, margin=0.0)
    assert kept[0].neg == ["negative 1 1", "negative 1 2"] and drop.removed == 1


def test_the_drop_refuses_data_without_scores() -> None:
    with pytest.raises(UsageError, match="no row has both pos_scores and neg_scores"):
        drop_teacher_false_negatives([_record(1, None, None)], margin=0.0)


def test_unscored_rows_are_named() -> None:
    records = [_record(i, None, None) for i in range(1, 8)] + [_record(8, [1.0], [0.0] * 3)]
    with pytest.raises(UsageError) as caught:
        refuse_unscored_rows(records)
    message = str(caught.value)
    assert "7 of 8 rows have no teacher scores" in message
    assert "rows.jsonl:1, rows.jsonl:2" in message and "and 2 more" in message
    refuse_unscored_rows(records[-1:])


def _scored(path: Path, rows: int = 12, unscored: tuple[int, ...] = ()) -> Path:
    with open(path, "w") as fh:
        for i in range(rows):
            row = {
                "query": f"which document is about topic {i % 5}",
                "pos": [f"document number {i} about topic {i % 5}"],
                "neg": [f"unrelated text {i} {j}" for j in range(3)],
            }
            if i not in unscored:
                row |= {"pos_scores": [2.0], "neg_scores": [2.5 if i % 3 == 0 else 0.3, 0.2, 0.1]}
            fh.write(json.dumps(row) + "\n")
    return path


def test_distillation_refuses_unscored_rows_before_any_work(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _scored(tmp_path / "rows.jsonl", unscored=(2, 5))
    out = tmp_path / "run"
    assert run_in_process(train_argv(tiny_model, rows, out, "--knowledge-distillation")) == 2
    err = capsys.readouterr().err
    named = f"2 of 12 rows have no teacher scores (pos_scores / neg_scores): {rows}:3, {rows}:6"
    assert named in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    argv = train_argv(tiny_model, rows, out, "--knowledge-distillation", "--allow-unscored-rows")
    assert run_in_process([*argv, "--max-steps", "2"]) == 0


@pytest.mark.parametrize("kd_loss_type", ["kl_div", "m3_kd_loss", "margin_mse"])
def test_a_distillation_run_logs_the_teachers_agreement(
    tiny_model: Path, tmp_path: Path, kd_loss_type: str
) -> None:
    rows = _scored(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    argv = train_argv(
        tiny_model, rows, out, "--knowledge-distillation", "--kd-loss-type", kd_loss_type,
        "--teacher-temperature", "0.5", "--max-steps", "3", "--negative-fill", "corpus",
    )  # fmt: skip
    assert run_in_process(argv) == 0
    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    prefix = "kl_div_" if kd_loss_type == "kl_div" else ""
    train_records = [r for r in records if "loss" in r]
    assert train_records
    for record in train_records:
        assert 0 <= record[f"{prefix}top1_agreement"] <= 1
        assert -1 <= record[f"{prefix}rank_correlation"] <= 1
        assert record[f"{prefix}teacher_entropy"] > 0
        assert record[f"{prefix}kd_queries"] == 4
    if kd_loss_type == "kl_div":
        assert "accuracy" in train_records[0]  # InfoNCE's signals stay under their names


def test_dropped_teacher_false_negatives_are_printed_and_saved(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _scored(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    argv = train_argv(tiny_model, rows, out, "--drop-teacher-false-negatives", "0")
    assert run_in_process([*argv, "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "removed 4 negatives scored above (lowest positive - 0) from 4 of 12 scored rows" in (
        printed
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["teacher_false_negatives_dropped"] == {
        "margin": 0.0, "removed": 4, "rows": 4, "checked_rows": 12,
    }  # fmt: skip


def test_the_train_start_warns_about_teacher_disputed_negatives(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _scored(tmp_path / "rows.jsonl")
    assert run_in_process(train_argv(tiny_model, rows, tmp_path / "run", "--max-steps", "1")) == 0
    assert "warning: 4 negatives in 4 rows (33%) are scored by the teacher at or above" in (
        capsys.readouterr().out
    )


def test_a_killed_distillation_run_resumes_bit_exact(tiny_model: Path, tmp_path: Path) -> None:
    rows = _scored(tmp_path / "rows.jsonl")
    kd = ("--knowledge-distillation", "--cache-chunk-size", "5")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_in_process(train_argv(tiny_model, rows, reference, *kd)) == 0
    run_until_killed(train_argv(tiny_model, rows, out, *kd), KILL_AT_STEP_ENV, 5)
    assert run_in_process(train_argv(tiny_model, rows, out, *kd, "--resume")) == 0
    assert_same_as_reference(out, reference)


def test_inspect_reports_the_teachers_suspects(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _scored(tmp_path / "rows.jsonl")
    report = tmp_path / "inspect.json"
    assert main(["inspect", "--train-data", str(rows), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "4 scored at or above the row's lowest positive (4 rows, 33.3%)" in printed
    check = json.loads(report.read_text())["audit"]["teacher_check"]
    assert check["suspects"] == 4 and len(check["worst"]) == 4
    assert check["worst"][0]["excess"] == pytest.approx(0.5)


def test_rows_scored_by_embtune_score_train_with_distillation(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as fh:
        for i in range(8):
            row = {"query": f"topic {i}", "pos": [f"doc {i}"], "neg": [f"other {i}", f"x {i}"]}
            fh.write(json.dumps(row) + "\n")
    scored = tmp_path / "scored.jsonl"
    argv = ["score", "--teacher", str(tiny_model), "--teacher-kind", "bi-encoder"]
    argv += ["--train-data", str(rows), "-o", str(scored), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    out = tmp_path / "run"
    kd = ("--knowledge-distillation", "--teacher-temperature", "0.05", "--max-steps", "2")
    assert run_in_process(train_argv(tiny_model, scored, out, *kd)) == 0
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert all(r["kl_div_kd_queries"] == 4 and r["kl_div_unscored_group_slots"] == 0 for r in log)
    assert {"loss_infonce", "loss_kl_div"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["loss_infonce"] + log[0]["loss_kl_div"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--kd-loss-type", "m3_kd_loss"],
            "--kd-loss-type m3_kd_loss needs --knowledge-distillation",
        ),
        (["--teacher-temperature", "0.5"], "--teacher-temperature only applies with"),
        (["--allow-unscored-rows"], "--allow-unscored-rows only applies with"),
        (["--knowledge-distillation", "--teacher-temperature", "0"], "must be a positive number"),
        (["--drop-teacher-false-negatives", "nan"], "must be a finite number"),
    ],
)
def test_distillation_options_without_effect_or_out_of_range_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    argv = ["train", "--model", "m", "--train-data", "t.jsonl", "-o", str(tmp_path / "o")]
    assert main([*argv, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
