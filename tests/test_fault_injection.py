"""Fault injection: a full disk mid-run and two runs in one folder, each against its promise.

The other faults have their own modules: SIGKILL at a random step and during a save
(tests/test_resume.py), damaged checkpoints (tests/test_checkpoint_integrity.py), pre-emption
signals (tests/test_stop_signals.py), a busy folder's lock (tests/test_run_lock.py).

A full disk is a real one: a small tmpfs mounted for the test (root only, as in CI); where it
cannot be mounted the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embtune.checkpoint import list_checkpoints, read_trainer_state
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


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` (and at most ``inodes`` files) at ``folder`` for the block;
    skips the test where it cannot be mounted."""
    folder.mkdir()
    options = f"size={megabytes}m" + (f",nr_inodes={inodes}" if inodes else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def train_process(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embtune", *argv],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_disk_full_at_a_checkpoint_stops_with_3_and_the_run_resumes_exactly(
    tiny_model, data, reference, tmp_path
) -> None:
    """A checkpoint of the tiny model takes 13 MB: on 32 MB the third one cannot be written."""
    with small_disk(tmp_path / "disk", 32) as disk:
        out = disk / "run"
        done = train_process(train_argv(tiny_model, data, out))
        assert done.returncode == 3, done.stderr[-2000:]
        message = done.stderr.strip().splitlines()[-1]
        assert "step 6: could not write checkpoint-6: the disk is full" in message
        assert f"{out / 'checkpoint-4'} is intact" in message and "--resume" in message
        assert "Traceback" not in done.stderr
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert [c.name for c in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
        shutil.rmtree(out / "checkpoint-2")  # the user frees space
        assert run_in_process(train_argv(tiny_model, data, out, "--resume")) == 0
        assert_same_as_reference(out, reference)


def test_a_disk_filled_by_another_process_mid_run_stops_with_3(tiny_model, data, tmp_path) -> None:
    with small_disk(tmp_path / "disk", 8) as disk:
        out = disk / "run"
        argv = train_argv(tiny_model, data, out, "--max-steps", "3000", "--save-steps", "0")
        process = subprocess.Popen(
            [sys.executable, "-m", "embtune", *argv],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / LOG_FILE).is_file():
            time.sleep(0.2)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as fh:
            while True:  # another job takes every byte that is left
                fh.write(b"\0" * 65536)
                fh.flush()
        _, err = process.communicate(timeout=240)
    assert process.returncode == 3, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "the disk is full" in last and "Traceback" not in err
    # Whichever write met the full disk first: the log, TensorBoard's events, the final model.
    written = (f"could not write {LOG_FILE}", "could not write TensorBoard events", "final model")
    assert any(what in last for what in written), last


def test_two_runs_started_together_into_one_folder_leave_one_consistent_run(
    tiny_model, data, tmp_path
) -> None:
    out = tmp_path / "run"
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "embtune", *train_argv(tiny_model, data, out, "--seed", seed)],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another embtune run" in refused and "Traceback" not in refused
    winner = "1" if results[0][0] == 0 else "2"
    seeds = {read_trainer_state(c, "--resume")["config"]["seed"] for c in list_checkpoints(out)}
    assert seeds == {int(winner)}
    assert read_trainer_state(out, "--resume")["config"]["seed"] == int(winner)


@pytest.mark.parametrize("inodes", [5, 8, 11])
def test_a_disk_full_before_the_first_step_is_one_line_with_exit_2(
    tiny_model, data, tmp_path, inodes
) -> None:
    """A disk with room for only a few files fails at one of the setup writes (lock, config,
    budget, TensorBoard's folders and files, train_log.jsonl): refused, nothing trained."""
    with small_disk(tmp_path / "disk", 32, inodes=inodes) as disk:
        out = disk / "run"
        cache = str(tmp_path / "cache")  # the token cache elsewhere: only the run folder is full
        done = train_process(
            train_argv(tiny_model, data, out, "--save-steps", "0", "--cache-dir", cache)
        )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("embtune")]
    assert len(errors) == 1 and "the disk is full" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
