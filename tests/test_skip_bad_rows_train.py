"""`embtune train --skip-bad-rows`: bad rows left out, counted, listed; the default refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtune.run_files import REJECTED_FILE, SUMMARY_FILE
from tests.test_resume import run_in_process


def rows_file(folder: Path) -> Path:
    path = folder / "train.jsonl"
    good = [
        json.dumps({"query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i} {j}" for j in range(3)]})
        for i in range(10)
    ]
    bad = ['{"query": "", "pos": ["x"]}', '{"query": "q", "pos": []}', "{not json"]
    path.write_text("\n".join(good[:4] + bad + good[4:]) + "\n")
    return path


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
        "--batch-size", "4", "--train-group-size", "3", "--max-steps", "2",
        "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def test_by_default_bad_rows_refuse_the_input(tiny_model, tmp_path, capsys) -> None:
    data = rows_file(tmp_path)
    assert run_in_process(argv(tiny_model, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"{data}:5:" in err and f"{data}:7:" in err
    assert not (tmp_path / "run").exists()


def test_skip_bad_rows_trains_on_the_good_ones_and_lists_the_rest(
    tiny_model, tmp_path, capsys
) -> None:
    data = rows_file(tmp_path)
    out = tmp_path / "run"
    assert run_in_process(argv(tiny_model, data, out, "--skip-bad-rows")) == 0
    printed = capsys.readouterr().out
    assert "3 bad rows left out (--skip-bad-rows); each with its file, line and problem in " in (
        printed
    )
    report = [json.loads(line) for line in (out / REJECTED_FILE).read_text().splitlines()]
    assert sorted({(r["file"], r["line"]) for r in report}) == [
        (str(data), 5),
        (str(data), 6),
        (str(data), 7),
    ]
    assert all(r["reason"] for r in report)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rejected_rows"] == 3


@pytest.mark.parametrize("flag", ["--skip-bad-rows", "--no-skip-bad-rows"])
def test_the_option_reads_from_yaml_and_flags(tmp_path: Path, flag: str) -> None:
    from embtune.cli import build_parser
    from embtune.config import resolve_config

    args = ["train", "--model", "m", "--train-data", "t", "-o", "o", flag]
    config = resolve_config(build_parser().parse_args(args))
    assert config.skip_bad_rows is (flag == "--skip-bad-rows")
