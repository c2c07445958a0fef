"""--report-to (training/trackers.py): names checked, missing packages refused before any work,
and wandb / MLflow receiving the log through accelerate (each only where installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embtune.cli import main
from embtune.config import TrainConfig
from embtune.errors import UsageError
from embtune.training.logbook import Logbook
from embtune.training.run import start_accelerator
from embtune.training.trackers import chosen_trackers, mlflow_name, start_trackers
from tests.conftest import NQ_FILE


def config_for(out: Path, *report_to: str) -> TrainConfig:
    return TrainConfig(
        model="m", train_data=["t.jsonl"], output_dir=str(out), report_to=list(report_to)
    )


@pytest.mark.parametrize(
    ("report_to", "message"),
    [
        (["comet"], "--report-to takes tensorboard, wandb, mlflow, none; got 'comet'"),
        (["none", "wandb"], "--report-to none reports nowhere; drop it or wandb"),
        ([], "--report-to takes tensorboard, wandb, mlflow, none; got nothing"),
    ],
)
def test_report_to_takes_known_names_and_none_alone(report_to: list[str], message: str) -> None:
    with pytest.raises(UsageError) as refused:
        config_for(Path("out"), *report_to).validate()
    assert str(refused.value) == message


def test_trackers_are_named_once_and_none_is_no_tracker() -> None:
    config = config_for(Path("out"), "tensorboard", "wandb", "tensorboard")
    assert chosen_trackers(config) == ["tensorboard", "wandb"]
    assert chosen_trackers(config_for(Path("out"), "none")) == []


def test_mlflow_gets_metric_names_it_accepts() -> None:
    assert mlflow_name("dev_ndcg@10") == "dev_ndcg_at_10"
    assert mlflow_name("reference/scifact/ndcg@10_dim64") == "reference/scifact/ndcg_at_10_dim64"
    assert mlflow_name("loss") == "loss"


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model), "--train-data", str(NQ_FILE), "-o", str(out)]
    assert main([*args, "--report-to", "tensorboard", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb: the wandb package is not installed (pip install wandb)" in err
    assert "Traceback" not in err
    assert not out.exists()


def log_two_records(config: TrainConfig, out: Path) -> None:
    """What a run does with its trackers: start them, log, end (no model needed)."""
    out.mkdir(parents=True, exist_ok=True)
    accelerator = start_accelerator(config, out)
    start_trackers(accelerator, config, out, 0)
    logbook = Logbook(accelerator, [], out)
    logbook.write({"step": 1, "loss": 2.5, "epoch": 0})
    logbook.write({"step": 2, "loss": 1.5, "dev_ndcg@10": 0.25})
    accelerator.end_training()


def test_wandb_offline_receives_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    log_two_records(config_for(out, "wandb"), out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the run's records are in its .wandb file"
    assert not (out / "tensorboard").exists()


def test_mlflow_with_a_file_tracking_uri_receives_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 warns off file stores
    out = tmp_path / "run"
    log_two_records(config_for(out, "mlflow"), out)
    (loss,) = store.rglob("metrics/loss")
    assert [line.split()[1:] for line in loss.read_text().splitlines()] == [
        ["2.5", "1"],
        ["1.5", "2"],
    ]
    (ndcg,) = store.rglob("metrics/dev_ndcg_at_10")
    assert ndcg.read_text().split()[1:] == ["0.25", "2"]
    (batch_size,) = store.rglob("params/batch_size")
    assert batch_size.read_text() == "16"
