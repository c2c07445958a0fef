"""Checkpoints are verified before they are trusted: a damaged one is refused or passed over.

Every checkpoint's trainer_state.json lists its files with sizes and checksums (embtune.manifest);
--resume takes the newest intact checkpoint and says which it passed over, --resume-from refuses
a damaged one naming the file, and nothing in the run folder is rewritten before the checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtune.checkpoint import KILL_AT_STEP_ENV, STATE_DIR, TRAINER_STATE_FILE, list_checkpoints
from embtune.manifest import MANIFEST_KEY
from embtune.run_files import LOG_FILE
from tests.test_resume import (
    assert_same_as_reference,
    run_in_process,
    run_until_killed,
    train_argv,
)
from tests.test_train_integration import _tiny_beir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_beir(tmp_path_factory.mktemp("data") / "beir")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(train_argv(tiny_model, data, out)) == 0
    return out


def killed_run(tiny_model: Path, data: Path, out: Path) -> list[Path]:
    """A run SIGKILLed at step 7: checkpoints 2, 4 and 6 on disk."""
    run_until_killed(train_argv(tiny_model, data, out), KILL_AT_STEP_ENV, 7)
    checkpoints = list_checkpoints(out)
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return checkpoints


def flip_bytes(path: Path, at: int = 4096, count: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + count] = bytes(b ^ 0xFF for b in raw[at : at + count])
    path.write_bytes(bytes(raw))


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())


def test_every_checkpoint_lists_its_files_with_checksums(tiny_model, data, tmp_path) -> None:
    checkpoint = killed_run(tiny_model, data, tmp_path / "run")[-1]
    listed = state_of(checkpoint)[MANIFEST_KEY]
    on_disk = {
        p.relative_to(checkpoint).as_posix()
        for p in checkpoint.rglob("*")
        if p.is_file() and p.name != TRAINER_STATE_FILE
    }
    assert set(listed) == on_disk
    assert f"{STATE_DIR}/random_states_0.pkl" in listed and "model.safetensors" in listed
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] >= 0 for entry in listed.values())


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (lambda c: flip_bytes(c / "model.safetensors"), "model.safetensors"),
        (lambda c: (c / STATE_DIR / "random_states_0.pkl").unlink(), "random_states_0.pkl"),
        (lambda c: (c / STATE_DIR / "optimizer.bin").write_bytes(b""), "optimizer.bin"),
    ],
    ids=["flipped-weights", "missing-rng", "empty-optimizer"],
)
def test_resume_passes_over_a_damaged_checkpoint_and_ends_exactly(
    tiny_model, data, reference, tmp_path, capsys, damage, file
) -> None:
    out = tmp_path / "run"
    newest = killed_run(tiny_model, data, out)[-1]
    damage(newest)
    assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-6 is damaged" in printed and file in printed
    assert "passed over for checkpoint-4" in printed
    assert_same_as_reference(out, reference)


def test_resume_from_a_damaged_checkpoint_is_refused_before_anything_is_written(
    tiny_model, data, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    newest = killed_run(tiny_model, data, out)[-1]
    flip_bytes(newest / STATE_DIR / "optimizer.bin", at=100_000)
    log_before = (out / LOG_FILE).read_bytes()
    events_before = sorted(p.name for p in (out / "tensorboard").rglob("*"))
    argv = train_argv(tiny_model, data, out, "--resume-from", str(newest))
    assert run_in_process(argv) == 2
    err = capsys.readouterr().err
    assert f"{newest} is damaged: {STATE_DIR}/optimizer.bin" in err
    assert "checkpoint-4 is intact" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / LOG_FILE).read_bytes() == log_before
    assert sorted(p.name for p in (out / "tensorboard").rglob("*")) == events_before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("step"), "key 'step' is missing"),
        (lambda s: s.update(step="five"), "'step' must be a whole number"),
        (lambda s: s.update(history={}), "'history' must be a list"),
    ],
    ids=["no-step", "text-step", "history-not-a-list"],
)
def test_a_damaged_trainer_state_is_one_line(
    tiny_model, data, tmp_path, capsys, edit, message
) -> None:
    out = tmp_path / "run"
    newest = killed_run(tiny_model, data, out)[-1]
    state = state_of(newest)
    edit(state)
    (newest / TRAINER_STATE_FILE).write_text(json.dumps(state))
    assert run_in_process(train_argv(tiny_model, data, out, "--resume-from", str(newest))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_checkpoint_without_a_manifest_gets_the_checks_its_files_allow(
    tiny_model, data, reference, tmp_path, capsys
) -> None:
    """Checkpoints written before manifests: sizes, safetensors headers, zip CRCs."""
    out = tmp_path / "run"
    checkpoints = killed_run(tiny_model, data, out)
    for checkpoint in checkpoints:
        state = state_of(checkpoint)
        del state[MANIFEST_KEY]
        (checkpoint / TRAINER_STATE_FILE).write_text(json.dumps(state))
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
    assert "checkpoint-6 is damaged (model.safetensors: tensor data runs past" in (
        capsys.readouterr().out
    )
    assert_same_as_reference(out, reference)
