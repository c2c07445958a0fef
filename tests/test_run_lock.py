"""One run per output folder: a second run or resume into a busy folder is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embtune.run_files import LOCK_FILE, LOG_FILE
from embtune.run_lock import FolderBusy, RunLock
from tests.conftest import subprocess_env
from tests.test_resume import run_in_process, train_argv
from tests.test_train_integration import _tiny_beir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_beir(tmp_path_factory.mktemp("data") / "beir")


def test_a_held_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    # A second open file description in this process conflicts like another process would.
    with pytest.raises(FolderBusy, match=f"pid {os.getpid()} on"):
        second.acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # emptied: nobody holds it
    assert second.acquire() is None
    second.release()


def test_a_run_into_a_busy_folder_is_refused_in_one_line(tiny_model, data, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out)
    holder.acquire()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "embtune", *train_argv(tiny_model, data, out)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=300,
        )
    finally:
        holder.release()
    assert done.returncode == 2
    assert f"is in use by another embtune run (pid {os.getpid()} on" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written


def test_a_busy_folder_with_files_is_refused_as_busy_not_as_not_empty(tmp_path: Path) -> None:
    # The second of two runs started together often finds the first's files already there;
    # it must be told the folder is in use, not that it holds "a previous run".
    from embtune.config import TrainConfig
    from embtune.errors import UsageError
    from embtune.training.preflight import check_output_dir

    holder = RunLock(tmp_path)
    holder.acquire()
    (tmp_path / LOG_FILE).write_text("")
    config = TrainConfig(output_dir=str(tmp_path))
    busy = f"is in use by another embtune run \\(pid {os.getpid()} on"
    try:
        with pytest.raises(UsageError, match=busy):
            check_output_dir(config)
        assert RunLock.holder(tmp_path) is not None
    finally:
        holder.release()
    assert RunLock.holder(tmp_path) is None
    with pytest.raises(UsageError, match="is not empty"):
        check_output_dir(config)


def test_the_lock_of_a_dead_run_is_taken_over_with_a_note(
    tiny_model, data, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 999999, "host": "node7", "started": 0, "command": "embtune train"}
    (out / LOCK_FILE).write_text(json.dumps(dead))  # its text, but no process holds it
    assert run_in_process(train_argv(tiny_model, data, out, "--max-steps", "1")) == 0
    printed = capsys.readouterr().out
    assert "took over the lock of a run that ended without releasing it (pid 999999 on node7" in (
        printed
    )
    assert (out / LOG_FILE).is_file()
    assert (out / LOCK_FILE).read_text() == ""  # released at the end
