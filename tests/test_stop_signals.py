"""Pre-emption: SIGTERM / SIGUSR1 / Ctrl-C checkpoint at the step boundary and exit 3; the
run then resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embtune.checkpoint import SIGNAL_AT_STEP_ENV, list_checkpoints
from embtune.run_files import LOG_FILE
from tests.conftest import subprocess_env
from tests.test_resume import assert_same_as_reference, run_in_process, train_argv
from tests.test_train_integration import _tiny_beir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_beir(tmp_path_factory.mktemp("data") / "beir")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(train_argv(tiny_model, data, out)) == 0
    return out


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_stop_signal_checkpoints_the_step_and_resume_ends_exactly(
    tiny_model, data, reference, tmp_path, name
) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "embtune", *train_argv(tiny_model, data, out)],
        env=subprocess_env(**{SIGNAL_AT_STEP_ENV: f"{name}:5"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"stopped by {name} after step 5 of 8" in done.stderr
    assert "continue it with --resume" in done.stderr and "Traceback" not in done.stderr
    # checkpoint-4 is the periodic one; checkpoint-5 was written for the signal.
    assert [c.name for c in list_checkpoints(out)][-1] == "checkpoint-5"
    assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
    assert_same_as_reference(out, reference)


def test_a_signal_on_a_checkpoint_step_does_not_save_twice(tiny_model, data, tmp_path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "embtune", *train_argv(tiny_model, data, out)],
        env=subprocess_env(**{SIGNAL_AT_STEP_ENV: "SIGTERM:4"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3
    assert f"{out / 'checkpoint-4'} holds the run" in done.stderr
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_sigterm_from_outside_stops_within_a_step(tiny_model, data, tmp_path) -> None:
    """As a scheduler sends it: the run stops after the step in progress, checkpointed."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--max-steps", "400", "--save-steps", "0")
    process = subprocess.Popen(
        [sys.executable, "-m", "embtune", *argv],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        log = out / LOG_FILE
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert process.returncode == 3, err[-2000:]
    step = int(err.split("after step ")[1].split()[0])
    assert [c.name for c in list_checkpoints(out)] == [f"checkpoint-{step}"]
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["step"] == step and step < 400
    assert seconds < 30, seconds  # one tiny step plus the checkpoint, with a wide margin


def test_under_torchrun_a_signal_to_one_process_stops_both_after_the_same_step(
    tiny_model, data, tmp_path
) -> None:
    from tests.test_train_step import _free_port

    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--batch-size", "2")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "embtune", *argv]  # fmt: skip
    done = subprocess.run(
        command,
        env=subprocess_env(**{SIGNAL_AT_STEP_ENV: "SIGUSR1:3:1"}),  # rank 1 only
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "stopped by" in done.stderr and "after step 3 of 8" in done.stderr
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3
