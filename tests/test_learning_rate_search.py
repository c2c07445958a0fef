"""`--learning-rate auto`: the rule, the trials (child processes), the files, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from embtune.cli import main
from embtune.config import TrainConfig
from embtune.errors import TrainingStopped, UsageError
from embtune.training.learning_rate_choice import Trial, choose_learning_rate
from tests.conftest import single_thread
from tests.test_config import resolve, usage_error, yaml_file
from tests.test_sweep import _jsonl

REQUIRED = ["--model", "m", "--train-data", "train.jsonl", "-o", "out"]


def _trial(rate: float, dev: float | None, status: str = "done", **reference: float | None):
    return Trial(rate, dev, dict(reference), status, error=None if dev else "exit 1")


# --- the rule ----------------------------------------------------------------------------------


def test_the_smallest_rate_within_the_tolerance_of_the_best_dev_ndcg_is_chosen() -> None:
    trials = [_trial(1e-5, 0.500), _trial(2e-5, 0.504), _trial(5e-5, 0.506), _trial(1e-4, 0.49)]
    choice = choose_learning_rate(trials, 0.005)
    assert (choice.learning_rate, choice.kept, choice.best_dev_ndcg10) == (
        2e-5,
        [2e-5, 5e-5],
        0.506,
    )
    assert choice.reason == (
        "the closest to the base model (the smallest learning rate) of the 2 of 4 within 0.005 "
        "of the best dev nDCG@10 (0.5060): learning rate 2e-05, 5e-05"
    )
    assert choose_learning_rate(trials, 0.0).learning_rate == 5e-5
    # 0.505 - 0.005 is 0.49999999999999994 in floating point; 0.500 is still within.
    assert choose_learning_rate([_trial(1e-5, 0.5), _trial(2e-5, 0.505)], 0.005).kept == [
        1e-5,
        2e-5,
    ]


def test_the_reference_sets_break_the_tie_among_the_kept_trials_only() -> None:
    trials = [
        _trial(1e-5, 0.500, fiqa=0.30, nfc=0.20),
        _trial(5e-5, 0.503, fiqa=0.31, nfc=0.22),
        _trial(1e-4, 0.420, fiqa=0.40, nfc=0.40),  # best off-domain, but far behind on dev
    ]
    choice = choose_learning_rate(trials, 0.005)
    assert choice.learning_rate == 5e-5
    assert choice.reason.startswith("the best mean reference nDCG@10 (0.2650) of the 2 of 3")
    # Equal reference means: the smaller rate, the conservative one.
    tied = [_trial(1e-5, 0.5, fiqa=0.3), _trial(2e-5, 0.5, fiqa=0.3)]
    assert choose_learning_rate(tied, 0.005).learning_rate == 1e-5
    # A kept trial without a reference number: the reference sets do not decide.
    missing = [_trial(1e-5, 0.5, fiqa=None), _trial(2e-5, 0.5, fiqa=0.9)]
    choice = choose_learning_rate(missing, 0.005)
    assert choice.learning_rate == 1e-5 and "did not decide" in choice.reason


def test_failed_trials_are_skipped_and_all_failed_is_one_error() -> None:
    trials = [_trial(1e-5, None, "failed"), _trial(2e-5, 0.3), _trial(5e-5, 0.302, "reused")]
    choice = choose_learning_rate(trials, 0.005)
    assert choice.learning_rate == 2e-5 and choice.reason.endswith("; 1 failed trial skipped")
    with pytest.raises(TrainingStopped) as info:
        choose_learning_rate([_trial(1e-5, None, "failed"), _trial(2e-5, None, "failed")], 0.005)
    assert str(info.value).startswith(
        "--learning-rate auto: no trial finished with a dev nDCG@10 (1e-05: exit 1)"
    )


# --- options -----------------------------------------------------------------------------------


def test_auto_and_the_search_options_are_read_from_flags_and_yaml(tmp_path: Path) -> None:
    config = resolve(*REQUIRED, "--learning-rate", "auto", "--learning-rate-grid", "1e-5", "3e-5")
    assert (config.learning_rate, config.learning_rate_grid) == ("auto", [1e-5, 3e-5])
    assert config.learning_rate_trial_steps == 0
    path = yaml_file(tmp_path, "learning_rate: auto\nlearning_rate_trial_steps: 7\n")
    config = resolve("--config", str(path), *REQUIRED)
    assert (config.learning_rate, config.learning_rate_trial_steps) == ("auto", 7)
    path = yaml_file(tmp_path, "learning_rate: fast\n")
    assert usage_error("--config", str(path), *REQUIRED) == (
        f"{path}:1: field 'learning_rate': expected float or auto, got str"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--learning-rate", "fast"],
            "--learning-rate must be a positive number or auto, got 'fast'",
        ),
        (
            ["--learning-rate-grid", "1e-5", "0"],
            "--learning-rate-grid must be one or more positive",
        ),
        (["--learning-rate-grid", "1e-5", "1e-5"], "--learning-rate-grid has 1e-05 twice"),
        (["--learning-rate-trial-steps", "-1"], "--learning-rate-trial-steps must not be negative"),
        (
            ["--learning-rate", "auto"],
            "--learning-rate auto chooses the rate on a dev set: give --eval-data DIR",
        ),
    ],
    ids=["not-a-number", "grid-zero", "grid-twice", "negative-steps", "no-dev-set"],
)
def test_bad_search_options_are_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    out = tmp_path / "out"
    assert main(["train", "--model", "m", "--train-data", "t.jsonl", "-o", str(out), *argv]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"embtune train: error: {expected}")
    assert not out.exists()


def test_a_sweep_refuses_auto_inside_its_runs(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tiny_model), "--train-data", str(data), "-o", str(out)]
    assert main([*argv, "--dev-fraction", "0.25", "--learning-rate", "auto", "1e-5"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune sweep: error: --learning-rate auto: a sweep's runs each take")
    assert not out.exists()


def test_auto_is_refused_where_its_trials_cannot_train_the_run() -> None:
    from embtune.training.learning_rate_search import check_search_launch

    config = TrainConfig(model="m", train_data=["t"], output_dir="o", learning_rate="auto")
    with pytest.raises(UsageError, match="not available under torchrun"):
        check_search_launch(config, 2, "bi-encoder", None)
    with pytest.raises(UsageError, match="cannot take an objective object"):
        check_search_launch(config, 1, "bi-encoder", SimpleNamespace())
    check_search_launch(config, 1, "bi-encoder", None)
    check_search_launch(TrainConfig(learning_rate=1e-5), 2, "bi-encoder", SimpleNamespace())


# --- a dev set given in memory ------------------------------------------------------------------


def test_a_dev_set_in_memory_is_written_as_a_beir_folder_the_trials_read(tmp_path: Path) -> None:
    from embtune.data.formats import BeirDataset, load_beir, write_beir
    from embtune.sweep import train_flags
    from embtune.training.learning_rate_search import plan_search
    from embtune.training.preflight import load_inputs

    dev = BeirDataset(
        corpus={"d1": "first passage", "d2": 'second passage, "quoted"\tand tabbed'},
        queries={"q1": "which is first?", "q2": "which is second?"},
        qrels={"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}},
    )
    write_beir(tmp_path / "beir", dev, "dev")
    again = load_beir(tmp_path / "beir", "dev")
    assert (again.corpus, again.queries, again.qrels) == (dev.corpus, dev.queries, dev.qrels)
    with pytest.raises(ValueError, match="cannot be written"):
        write_beir(tmp_path / "bad", BeirDataset({"d\t1": "x"}, {}, {}), "dev")

    data = _jsonl(tmp_path / "train.jsonl", rows=10)
    config = TrainConfig(
        model="m", train_data=[str(data)], output_dir=str(tmp_path / "run"), batch_size=2,
        learning_rate="auto", learning_rate_grid=[1e-5, 3e-5], dev_fraction=0.2, eval_steps=2,
        save_best=True, save_steps=3, interpolate_base="0.5", cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    inputs = load_inputs(config, dev)
    plan = plan_search(config, inputs, "bi-encoder")
    assert (plan.run_steps, plan.trial_steps) == (5, 1)  # 10 rows (none held out), 2 a step
    assert [p.label for p in plan.points] == ["lr1e-05", "lr3e-05"]
    trial = plan.points[1].config
    assert trial.output_dir == str(tmp_path / "run" / "learning_rate_search" / "runs" / "lr3e-05")
    search = tmp_path / "run" / "learning_rate_search"
    assert (trial.eval_data, trial.eval_split, trial.dev_fraction) == (
        str(search / "dev"),
        "dev",
        0,
    )
    flags = train_flags(trial)
    for flag in ("--learning-rate=3e-05", "--max-steps=1", f"--eval-data={search / 'dev'}"):
        assert flag in flags
    for option in ("--eval-steps", "--save-best", "--interpolate-base", "--learning-rate-grid"):
        assert not any(f.startswith(option) for f in flags), option
    assert "--save-steps=0" in flags and plan.dev_data is dev
    assert not (tmp_path / "run").exists()  # planning writes nothing


# --- end to end --------------------------------------------------------------------------------


def _train_args(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(tiny_model), "--train-data", str(data), "-o", str(out),
        "--dev-fraction", "0.25", "--batch-size", "4", "--train-group-size", "2",
        "--logging-steps", "1", "--query-max-len", "16", "--passage-max-len", "16",
        "--cache-dir", str(out.parent / "cache"), "--learning-rate", "auto",
        "--learning-rate-grid", "1e-4", "1e-3", "--learning-rate-trial-steps", "1", *extra,
    ]  # fmt: skip


def test_auto_trains_a_trial_per_rate_saves_the_choice_and_resume_reuses_it(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from embtune.checkpoint import SIGNAL_AT_STEP_ENV
    from embtune.run_files import CONFIG_FILE, LOG_FILE
    from embtune.training import run as run_module

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trials: one thread on busy shared cores
    data = _jsonl(tmp_path / "train.jsonl")  # 16 rows: 12 train (3 steps of 4), 4 dev
    out = tmp_path / "run"
    search = out / "learning_rate_search"
    args = _train_args(tiny_model, data, out)

    # 1. The search, then a crash before the run's model is loaded.
    def crash(*_: object) -> None:
        raise RuntimeError("crashed after the search")

    monkeypatch.setattr(run_module, "prepare_run", crash)
    with single_thread(), pytest.raises(RuntimeError, match="crashed after the search"):
        main(args)
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert "--learning-rate auto: 2 trials x 1 steps = 2 steps, 0.7x the run's 3" in printed
    assert "[1/2] lr0.0001: training" in printed and "[2/2] lr0.001: training" in printed
    assert "the first trial took" in printed
    assert "| lr | dev nDCG@10 | seconds | status |" in printed
    choice = json.loads((search / "choice.json").read_text())
    chosen = choice["chosen_learning_rate"]
    assert (choice["grid"], choice["trial_steps"], choice["run_steps"]) == ([1e-4, 1e-3], 1, 3)
    assert chosen in (1e-4, 1e-3) and choice["rule"].startswith(
        "keep the candidates whose dev nDCG@10"
    )
    assert f"learning rate {chosen!r}: {choice['reason']}" in printed
    for trial, rate in zip(choice["trials"], [1e-4, 1e-3], strict=True):
        log = [json.loads(x) for x in (Path(trial["run_dir"]) / LOG_FILE).read_text().splitlines()]
        assert trial["status"] == "done" and trial["learning_rate"] == rate
        assert trial["dev_ndcg10"] == [r for r in log if "dev_ndcg@10" in r][-1]["dev_ndcg@10"]
        saved = yaml.safe_load((Path(trial["run_dir"]) / CONFIG_FILE).read_text())
        assert (saved["learning_rate"], saved["max_steps"], saved["dev_fraction"]) == (
            rate,
            1,
            0.25,
        )
        assert (saved["eval_steps"], saved["save_steps"], saved["save_best"]) == (0, 0, False)
    assert "chosen" in (search / "table.md").read_text()

    # 2. --resume: the choice is reused, no trial trains; a SIGTERM stops the run after step 2.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "SIGTERM:2")  # never reached by a 1-step trial
    with single_thread():
        assert main([*args, "--resume"]) == 3
    printed = capsys.readouterr().out
    assert f"--learning-rate auto: {chosen!r}, chosen by the earlier search" in printed
    assert "training (log:" not in printed
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["learning_rate"] == chosen

    # 3. --resume from the checkpoint: its rate, and the run ends; the search folder is kept.
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    with single_thread():
        assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"--learning-rate auto: {chosen!r}, the search's choice, as " in printed
    assert "checkpoint-2 has it" in printed and "training (log:" not in printed
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["learning_rate"] == chosen
    assert json.loads((out / "trainer_state.json").read_text())["config"]["learning_rate"] == chosen
    assert (search / "choice.json").is_file() and (search / "runs" / "lr0.001").is_dir()
