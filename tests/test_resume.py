"""Resume and checkpoints: a run killed with SIGKILL and resumed ends as if never killed.

The killed runs are real `python -m embtune train` processes that SIGKILL themselves through
the test hooks in embtune.checkpoint (EMBTUNE_TEST_KILL_AT_STEP / _DURING_SAVE); the
uninterrupted reference and the resumed runs run in-process on one thread, which computes
exactly like the one-thread child processes.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from embtune.checkpoint import (
    KILL_AT_STEP_ENV,
    KILL_DURING_SAVE_ENV,
    STATE_DIR,
    TRAINER_STATE_FILE,
    list_checkpoints,
    read_trainer_state,
)
from embtune.cli import main
from embtune.models.encoder import Encoder
from embtune.run_files import LOCK_FILE
from embtune.training.run import LOG_FILE
from tests.conftest import single_thread, subprocess_env
from tests.test_train_integration import _tiny_beir

STEPS = 8  # 3 steps per epoch: a resume point can fall inside an epoch or on its boundary


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`embtune train` arguments of the runs compared here (dropout on, so RNG state matters)."""
    return [
        "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
        "--batch-size", "4", "--train-group-size", "3", "--max-steps", str(STEPS),
        "--logging-steps", "1", "--save-steps", "2", "--learning-rate", "1e-3",
        "--warmup-ratio", "0.25", "--seed", "11", "--cache-dir", str(out.parent / "cache"),
        *extra,
    ]  # fmt: skip


def run_in_process(argv: list[str]) -> int:
    with single_thread():
        return main(argv)


def run_until_killed(argv: list[str], hook: str, step: int) -> None:
    """Run `python -m embtune` in a child process that SIGKILLs itself at ``step``."""
    proc = subprocess.run(
        [sys.executable, "-m", "embtune", *argv],
        env=subprocess_env(**{hook: str(step)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in log_rows(out) if "loss" in r]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def tensorboard_steps(out: Path, tag: str = "loss") -> list[int]:
    """Steps of a scalar as TensorBoard shows them (it drops events a resumed run purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def assert_same_as_reference(out: Path, reference: Path) -> None:
    ref = losses(reference)
    assert [step for step, _ in ref] == list(range(1, STEPS + 1))
    got = losses(out)
    assert [step for step, _ in got] == [step for step, _ in ref], "log lines lost or repeated"
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in ref], abs=1e-6)
    assert max_weight_difference(out, reference) <= 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_beir(tmp_path_factory.mktemp("data") / "beir")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(train_argv(tiny_model, data, out)) == 0
    return out


def test_killed_at_a_random_step_then_resumed_ends_like_the_uninterrupted_run(
    tiny_model: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    kill_at = random.randint(2, STEPS)
    print(f"killed at step {kill_at}")  # pytest shows it when the test fails
    out = tmp_path / "run"
    run_until_killed(train_argv(tiny_model, data, out), KILL_AT_STEP_ENV, kill_at)
    # Killed after step kill_at's update, before its log line and checkpoint.
    assert [r["step"] for r in log_rows(out)] == list(range(1, kill_at)), kill_at
    assert not (out / "model.safetensors").exists()
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert saved == list(range(2, kill_at, 2)), kill_at  # none yet when killed at step 2

    assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
    assert_same_as_reference(out, reference)
    assert tensorboard_steps(out) == list(range(1, STEPS + 1)), kill_at


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(
    tiny_model: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_until_killed(train_argv(tiny_model, data, out), KILL_DURING_SAVE_ENV, 4)
    # The model of checkpoint-4 was half written in a temporary folder when the kill came.
    assert (out / ".checkpoint-4.tmp" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    previous = out / "checkpoint-2"
    assert read_trainer_state(previous)["step"] == 2
    assert (previous / STATE_DIR / "optimizer.bin").is_file()
    Encoder.from_pretrained(previous)  # loadable as a model
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3, 4]  # 3 and 4 come after checkpoint-2

    assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
    assert not (out / ".checkpoint-4.tmp").exists()
    assert_same_as_reference(out, reference)
    assert tensorboard_steps(out) == list(range(1, STEPS + 1))


def test_same_seed_gives_the_same_losses_and_weights(
    tiny_model: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    assert run_in_process(train_argv(tiny_model, data, out, "--save-steps", "0")) == 0
    assert_same_as_reference(out, reference)
    other = tmp_path / "other-seed"
    assert run_in_process(train_argv(tiny_model, data, other, "--seed", "12")) == 0
    assert losses(other) != losses(reference)


def test_checkpoints_hold_a_loadable_model_and_the_training_state(reference: Path) -> None:
    from sentence_transformers import SentenceTransformer

    assert [p.name for p in list_checkpoints(reference)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    checkpoint = reference / "checkpoint-4"
    state = read_trainer_state(checkpoint)
    assert (state["step"], state["position"]) == (4, {"epoch": 1, "batch": 1})
    assert [r["step"] for r in state["history"]] == [1, 2, 3, 4]
    assert state["sampler"]["seed"] == 11
    files = {p.name for p in (checkpoint / STATE_DIR).iterdir()}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= files
    assert "model.safetensors" not in files  # the model is stored once, in the checkpoint root
    texts = ["a query about topic 3"]
    ours = Encoder.from_pretrained(checkpoint).encode_queries(texts)
    st = SentenceTransformer(str(checkpoint), device="cpu")
    theirs = st.encode(texts, convert_to_tensor=True, prompt_name="query").cpu()
    assert (ours - theirs).abs().max().item() < 1e-5
    # The finished run says so, and holds no temporary folders.
    assert read_trainer_state(reference, "--resume")["finished"] is True
    assert not [p for p in reference.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


def test_save_total_limit_keeps_the_newest_checkpoints(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--save-steps", "1", "--save-total-limit", "2")
    assert run_in_process(argv) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-7"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


def test_resume_from_names_a_checkpoint_and_continues_in_the_output_folder(
    tiny_model: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(reference / "checkpoint-4", copy)
    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--resume-from", str(copy))
    assert run_in_process(argv) == 0
    # The log so far travels with the checkpoint: the new folder holds the whole run's log.
    assert_same_as_reference(out, reference)


def test_resume_without_a_checkpoint_starts_fresh(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--resume", "--max-steps", "2")
    assert run_in_process(argv) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert [r["step"] for r in log_rows(out)] == [1, 2]


def test_resuming_a_finished_run_is_refused(
    tiny_model: Path, data: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in reference.rglob("*"))
    assert run_in_process(train_argv(tiny_model, data, reference, "--resume")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"embtune train: error: --resume: {reference} holds a finished run ({STEPS} steps); "
        "nothing to resume (--overwrite-output-dir trains it again)"
    ]
    assert sorted(p.name for p in reference.rglob("*")) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--learning-rate", "5e-4", "--batch-size", "2"],
            "was trained with other options: --batch-size 2 (was 4); --learning-rate 0.0005 "
            "(was 0.001). Resume with the run's options, or start a new run in another folder",
        ),
        (["--train-data", "OTHER"], "the training data differs from the data"),
    ],
    ids=["options", "data"],
)
def test_resume_refuses_what_would_train_something_else(
    tiny_model: Path,
    data: Path,
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    if "OTHER" in extra:
        other = _tiny_beir(tmp_path / "other")
        (other / "queries.jsonl").write_text(
            (other / "queries.jsonl").read_text().replace("topic", "subject")
        )
        extra = ["--train-data", str(other)]
    out = tmp_path / "run"
    checkpoint = reference / "checkpoint-2"
    argv = train_argv(tiny_model, data, out, "--resume-from", str(checkpoint), *extra)
    assert run_in_process(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_changing_only_logging_and_saving_options_is_allowed(
    tiny_model: Path, data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra = ["--save-steps", "3", "--save-total-limit", "1", "--max-nonfinite-steps", "2"]
    argv = train_argv(tiny_model, data, out, "--resume-from", str(reference / "checkpoint-2"))
    assert run_in_process([*argv, *extra]) == 0
    assert_same_as_reference(out, reference)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6"]


def test_resume_from_something_that_is_not_a_checkpoint(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    out = tmp_path / "run"
    argv = train_argv(tiny_model, data, out, "--resume-from", str(folder))
    assert run_in_process(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune train: error: --resume-from: {folder} is not an embtune checkpoint "
        f"(no {TRAINER_STATE_FILE})"
    ]
    assert not out.exists()


def test_a_resumed_run_writes_tensorboard_events_that_sort_after_the_killed_runs(
    tmp_path: Path,
) -> None:
    from embtune.training.logbook import wait_for_a_later_events_file

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    wait_for_a_later_events_file(tmp_path)
    assert int(time.time()) > now  # a file made now has a later name, whatever its pid


def _scored_rows(path: Path, score: float = 0.5) -> Path:
    with open(path, "w") as fh:
        for i in range(12):
            row = {
                "query": f"which document is about topic {i % 5}",
                "pos": [f"document number {i} about topic {i % 5}"],
                "neg": [f"unrelated text {i} {j}" for j in range(3)],
                "pos_scores": [0.9],
                "neg_scores": [score, 0.2, 0.1],
            }
            fh.write(json.dumps(row) + "\n")
    return path


def test_a_checkpoint_from_before_scores_counted_resumes_on_scored_data(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Checkpoints written before teacher scores were carried hashed the data without them;
    they trained on the same rows (scores were unused), so they continue exactly."""
    from embtune.checkpoint import FINGERPRINT_HAS_SCORES, data_fingerprint
    from embtune.data.formats import load_training_data

    rows = _scored_rows(tmp_path / "scored.jsonl")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_in_process(train_argv(tiny_model, rows, reference)) == 0
    run_until_killed(train_argv(tiny_model, rows, out), KILL_AT_STEP_ENV, 5)
    checkpoint = list_checkpoints(out)[-1]
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    assert state.pop(FINGERPRINT_HAS_SCORES) is True
    state["data_fingerprint"] = data_fingerprint(load_training_data([rows]).records, scores=False)
    (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps(state))  # as the old code wrote it
    assert run_in_process(train_argv(tiny_model, rows, out, "--resume")) == 0
    assert_same_as_reference(out, reference)


def test_a_changed_teacher_score_refuses_the_resume(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    run_until_killed(
        train_argv(tiny_model, _scored_rows(tmp_path / "a.jsonl"), out), KILL_AT_STEP_ENV, 3
    )
    changed = _scored_rows(tmp_path / "a.jsonl", score=0.6)
    assert run_in_process(train_argv(tiny_model, changed, out, "--resume")) == 2
    assert "the training data differs" in capsys.readouterr().err
