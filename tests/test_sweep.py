"""`embtune sweep`: a grid of short trainings in subprocesses, the table, plots and resuming."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from embtune.cli import main
from embtune.run_files import LOG_FILE
from embtune.sweep import (
    AXES,
    DataVariant,
    first_error_line,
    point_label,
    read_run,
    train_flags,
)


def _jsonl(path: Path, rows: int = 16, negatives: int = 3) -> Path:
    """Rows whose positive shares the query's topic word; negatives are other topics."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            neg = [f"passage {i}-{k} about subject {(i + k + 1) % rows}" for k in range(negatives)]
            row = {"query": f"what about subject {i}", "pos": [f"text on subject {i}"], "neg": neg}
            fh.write(json.dumps(row) + "\n")
    return path


def _sweep_args(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep", "--model", str(tiny_model), "--train-data", str(data), "-o", str(out),
        "--dev-fraction", "0.25", "--max-steps", "2", "--logging-steps", "1",
        "--query-max-len", "16", "--passage-max-len", "16",
        "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children train offline on one thread: faster for a tiny model on busy shared cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_grid_writes_table_csv_json_plots_from_the_runs_and_a_rerun_reuses_them(
    tiny_model: Path, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    args = _sweep_args(
        tiny_model, data, out, "--train-group-size", "2", "3", "--batch-size", "2", "4"
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    labels = ["g2-b2", "g2-b4", "g3-b2", "g3-b4"]
    assert all(f"[{i}/4] {label}: training" in printed for i, label in enumerate(labels, 1))
    for name in ("sweep.md", "sweep.csv", "sweep.json", "loss.png", "by_group_size.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 5000
    assert (out / "by_group_size.png").stat().st_size > 5000

    report = json.loads((out / "sweep.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert list(runs) == labels
    assert report["axes"] == {"train_group_size": [2, 3], "batch_size": [2, 4]}
    for label, run in runs.items():
        assert run["status"] == "done" and run["exit_code"] == 0
        log = [json.loads(x) for x in (out / "runs" / label / LOG_FILE).read_text().splitlines()]
        trained = [r for r in log if "loss" in r]
        dev = [r for r in log if "dev_ndcg@10" in r]
        assert run["loss"] == trained[-1]["loss"]
        assert run["chance_loss"] == trained[-1]["chance_loss"]
        assert run["dev_ndcg10"] == dev[-1]["dev_ndcg@10"]
        assert run["steps"] == 2
        summary = json.loads((out / "runs" / label / "train_summary.json").read_text())
        for key in ("texts_per_second", "peak_memory_bytes", "negative_coverage"):
            assert run[key] == summary[key], key
        assert run["max_rss_bytes"] > 50 * 2**20  # a python + torch process, measured per run
        assert run["config"]["train_group_size"] == int(label[1])
        assert run["config"]["batch_size"] == int(label.split("-b")[1])
    # Candidates per query follow B * G, so the chance level differs by configuration.
    assert runs["g3-b4"]["candidates_per_query"] > runs["g2-b2"]["candidates_per_query"]

    with open(out / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == labels
    assert [float(r["loss"]) for r in rows] == [runs[x]["loss"] for x in labels]
    assert [r["G"] for r in rows] == ["2", "2", "3", "3"]
    table = (out / "sweep.md").read_text()
    assert table.count("| done |") == 4
    first_loss = f"{runs['g2-b2']['loss']:.4f}"
    assert "| g2-b2 | 2 | 2 | done | 2 |" in table and first_loss in table

    # The same sweep again trains nothing: every run is reused, numbers unchanged.
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 of them finished in an earlier sweep and are reused" in printed
    assert "training (log:" not in printed
    again = {r["label"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert all(r["status"] == "reused" for r in again.values())
    assert [again[x]["loss"] for x in labels] == [runs[x]["loss"] for x in labels]
    assert again["g2-b2"]["max_rss_bytes"] == runs["g2-b2"]["max_rss_bytes"]


def test_a_crashed_run_is_a_failed_row_and_the_next_sweep_trains_it(
    tiny_model: Path,
    tmp_path: Path,
    one_thread: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from embtune.checkpoint import KILL_AT_STEP_ENV

    data = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    args = _sweep_args(tiny_model, data, out, "--train-group-size", "2")
    monkeypatch.setenv(KILL_AT_STEP_ENV, "1")  # the run kills itself after step 1
    assert main(args) == 1  # every run failed
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "failed" and run["error"] == "killed by SIGKILL (out of memory?)"
    assert "failed: killed by SIGKILL" in (out / "sweep.md").read_text()
    assert "FAILED (exit -9)" in capsys.readouterr().out

    monkeypatch.delenv(KILL_AT_STEP_ENV)
    assert main(args) == 0
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "done" and run["steps"] == 2 and run["loss"] is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-group-size", "4", "0"], "--train-group-size must be at least 1, got 0"),
        (["--batch-size", "4", "4"], "--batch-size: value 4 is given twice"),
        (["--negative-sampling", "random", "often"], "invalid choice: 'often'"),
        (["--resume"], "--resume: a sweep resumes by itself"),
        (["--data-variant", "bad name=x.jsonl"], "--data-variant: name 'bad name'"),
        (["--dev-fraction", "0"], "a sweep evaluates every configuration on a dev set"),
    ],
)
def test_bad_grid_options_are_refused_in_one_line(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    data = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    try:
        code = main([*_sweep_args(tiny_model, data, out), *extra])
    except SystemExit as exc:  # argparse refuses a value outside the choices itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not out.exists(), "nothing may be written when the sweep is refused"


def test_a_finished_run_with_other_options_is_not_silently_reused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    import yaml

    from embtune.config import add_arguments, resolve_config

    data = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    run = out / "runs" / "run"
    run.mkdir(parents=True)
    # The run folder of the same sweep trained earlier with --learning-rate 0.001.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [*_sweep_args(tiny_model, data, out)[1:], "--learning-rate", "0.001"]
    earlier = resolve_config(parser.parse_args(flags))
    (run / "train_config.yaml").write_text(yaml.safe_dump(earlier.to_dict()))
    (run / "trainer_state.json").write_text('{"finished": true}')
    assert main(_sweep_args(tiny_model, data, out, "--learning-rate", "2e-5")) == 2
    err = capsys.readouterr().err
    assert "is a finished run with other options (learning_rate 0.001 there, 2e-05 now)" in err


def test_data_variants_label_runs_and_replace_train_data(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _jsonl(tmp_path / "n1.jsonl", negatives=1)
    four = _jsonl(tmp_path / "n4.jsonl", negatives=4)
    args = [
        "sweep", "--model", str(tiny_model), "--data-variant", f"neg1={one}",
        "--data-variant", f"neg4={four}", "--train-group-size", "2", "4",
        "--dev-fraction", "0.25", "-o", str(tmp_path / "s"), "--dry-run",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for i, label in enumerate(["neg1-g2", "neg1-g4", "neg4-g2", "neg4-g4"], start=1):
        assert f"[{i}/4] {label}\n" in printed
    assert f"--train-data {four} " in printed and "--max-steps=50" in printed
    assert "every data variant has its own dev set" in printed
    assert not (tmp_path / "s").exists()
    both = [*args[:2], str(tiny_model), "--train-data", str(one), *args[3:]]
    assert main(both) == 2
    assert "--train-data and --data-variant exclude each other" in capsys.readouterr().err


def test_train_flags_reproduce_the_config() -> None:
    import argparse

    from embtune.config import TrainConfig, add_arguments, resolve_config

    config = TrainConfig(
        model="m",
        train_data=["a.jsonl", "b.jsonl"],
        output_dir="o",
        learning_rate=3e-5,
        in_batch_negatives=False,
        query_instruction="-q: ",
        negative_sampling="cycle",
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = train_flags(config)
    assert "--no-in-batch-negatives" in flags and "--learning-rate=3e-05" in flags
    again = resolve_config(parser.parse_args([*flags, "-o", "o"]))
    assert again == config


def test_labels_and_error_lines() -> None:
    values = {"data": "neg10", "train_group_size": 4, "batch_size": 8, "learning_rate": 2e-05}
    assert point_label(values, ["data", "train_group_size", "learning_rate"]) == "neg10-g4-lr2e-05"
    assert point_label(values, []) == "run"
    assert DataVariant("a", ("x",)).paths == ("x",)
    usage = "loading\rtraining 10%\nembtune train: error: --model: folder x does not exist\n"
    assert first_error_line(usage, 2) == "embtune train: error: --model: folder x does not exist"
    crash = "Traceback (most recent call last):\n  File x\n    y()\nRuntimeError: out of memory\n"
    assert first_error_line(crash, 1) == "RuntimeError: out of memory"
    assert first_error_line("", -9) == "killed by SIGKILL (out of memory?)"


def test_numbers_a_run_did_not_report_are_none(tmp_path: Path) -> None:
    (tmp_path / LOG_FILE).write_text(
        json.dumps({"step": 5, "loss": 1.0, "chance_loss": 2.0, "candidates_per_query": 7.4})
        + "\n"
        + '{"step": 6, "lo'  # a line cut short by a kill
    )
    numbers = read_run(tmp_path)
    assert numbers["loss"] == 1.0 and numbers["loss_over_chance"] == 0.5
    assert numbers["steps"] == 5
    for key in ("dev_ndcg10", "texts_per_second", "peak_memory_bytes", "negative_coverage"):
        assert numbers[key] is None, key
    (tmp_path / "train_summary.json").write_text(
        json.dumps(
            {
                "steps": 5,
                "texts_per_second": 12.5,
                "peak_memory_bytes": 1000,
                "negative_coverage": 0.3,
            }
        )
    )
    numbers = read_run(tmp_path, "embtune train: 5 steps in 1.0 s, 99.0 texts/s")
    assert numbers["texts_per_second"] == 12.5  # the summary wins over the console line
    assert numbers["peak_memory_bytes"] == 1000 and numbers["negative_coverage"] == 0.3


def test_the_sweep_reads_the_files_named_in_run_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    from embtune import run_files
    from embtune.sweep.plan import read_saved_config
    from embtune.sweep.results import run_finished

    assert not run_finished(tmp_path)
    (tmp_path / run_files.TRAINER_STATE_FILE).write_text('{"finished": true}')
    assert run_finished(tmp_path)
    (tmp_path / run_files.TRAINER_STATE_FILE).unlink()
    (tmp_path / run_files.SUMMARY_FILE).write_text('{"steps": 3}')
    assert run_finished(tmp_path) and read_run(tmp_path)["steps"] == 3
    (tmp_path / run_files.CONFIG_FILE).write_text("batch_size: 4\n")
    assert read_saved_config(tmp_path) == {"batch_size": 4}
    # The names come from run_files, not from embtune.training: `embtune --help` imports the
    # sweep command, and must not load torch.
    code = "import sys, embtune.sweep, embtune.commands.sweep; print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_the_axes_are_the_options_declared_sweepable(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    from dataclasses import fields

    from embtune.commands.sweep import DESCRIPTION, register
    from embtune.config import TrainConfig, flag
    from embtune.sweep.plan import AXIS_HEADER, AXIS_SHORT

    declared = {f.name: f.metadata["sweep"] for f in fields(TrainConfig) if "sweep" in f.metadata}
    assert set(AXES) == set(declared)
    # Grid order: run labels (the run folders an earlier sweep left to reuse) and CSV columns.
    assert AXES == (
        "train_group_size",
        "batch_size",
        "learning_rate",
        "temperature",
        "negative_sampling",
        "cache_chunk_size",
    )
    for name, sweep in declared.items():
        assert (AXIS_SHORT[name], AXIS_HEADER[name]) == (sweep["label"], sweep["header"])
        assert flag(name) in DESCRIPTION, name
    assert point_label({"train_group_size": 4, "batch_size": 16}, AXES[:2]) == "g4-b16"

    # The sweep command takes several values for exactly these options, of the option's type.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    grid = ["--train-group-size", "2", "4", "--learning-rate", "1e-5", "3e-5"]
    args = parser.parse_args(["sweep", *grid, "--negative-sampling", "random", "cycle"])
    assert args.train_group_size == [2, 4] and args.learning_rate == [1e-5, 3e-5]
    assert args.negative_sampling == ["random", "cycle"]
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--epochs", "1", "2"])
    assert "unrecognized arguments: 2" in capsys.readouterr().err
