"""Checkpoint folders: atomic replacement, recovery after a kill, rotation, resume checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embtune.checkpoint import (
    TRAINER_STATE_FILE,
    data_fingerprint,
    latest_checkpoint,
    list_checkpoints,
    recover_interrupted,
    rotate_checkpoints,
    save_atomically,
    save_into_folder,
)
from embtune.data.formats import Record
from embtune.data.groups import GroupSampler, TrainRow
from tests.conftest import assert_modes_follow, umask


def make_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(str(step))
    if complete:
        (folder / TRAINER_STATE_FILE).write_text("{}")
    return folder


def test_save_atomically_replaces_a_folder_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "best"

    def write(version: str):
        def inner(folder: Path) -> None:
            folder.mkdir()
            (folder / "weights").write_text(version)

        return inner

    save_atomically(target, write("1"))
    save_atomically(target, write("2"))
    assert (target / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _model_like_save(folder: Path) -> None:
    """What a model save writes: a sub-folder, JSON, and weights through safetensors, which
    creates its file private (0600) whatever the umask."""
    import torch
    from safetensors.torch import save_file

    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "1_Pooling" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))


@pytest.mark.parametrize(("mask", "file", "folder"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_folders_follow_the_umask(tmp_path: Path, mask: int, file: int, folder: int) -> None:
    out = tmp_path / "run"
    with umask(mask):
        out.mkdir()
        save_atomically(out / "best", _model_like_save)  # best/, interpolated/, merge output
        save_into_folder(out, _model_like_save)  # the final model beside the run's files
    assert (out / "model.safetensors").is_file() and (out / "best" / "model.safetensors").is_file()
    assert_modes_follow(out, file, folder)


def test_a_failed_write_keeps_the_old_folder_and_frees_the_space(tmp_path: Path) -> None:
    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("old")

    def fail(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_atomically(target, fail)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_recover_puts_back_what_a_kill_between_two_renames_left_aside(tmp_path: Path) -> None:
    (tmp_path / ".best.old").mkdir()  # best moved aside, the new one never arrived
    (tmp_path / ".checkpoint-4.old").mkdir()  # moved aside, but the new one is in place
    make_checkpoint(tmp_path, 4)
    (tmp_path / ".checkpoint-6.tmp").mkdir()  # killed while writing
    (tmp_path / ".checkpoint-2.deleting").mkdir()  # killed while rotating
    (tmp_path / ".git").mkdir()  # not ours: untouched
    done = recover_interrupted(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "best", "checkpoint-4"]
    assert "restored best from .best.old" in done


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)  # copied by hand, half-way: not trusted
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-9").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest_and_never_the_one_just_written(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    assert rotate_checkpoints(tmp_path, keep=0, current_step=8) == []
    # Resumed from checkpoint-2 and now at step 4: 6 and 8 (the abandoned future) are not
    # counted, so the new checkpoint-4 is kept.
    rotate_checkpoints(tmp_path, keep=1, current_step=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    rotate_checkpoints(tmp_path, keep=2, current_step=8)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sampler_state_round_trips_and_refuses_another_setup() -> None:
    rows = [
        TrainRow(query=i, pos=np.array([i]), neg=np.array([], dtype=np.int64)) for i in range(5)
    ]
    sampler = GroupSampler(rows, 4, "corpus", 20, seed=3)
    state = sampler.state_dict()
    GroupSampler(rows, 4, "corpus", 20, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 3 != 4"):
        GroupSampler(rows, 4, "corpus", 20, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="rows 5 != 4"):
        GroupSampler(rows[:4], 4, "corpus", 20, seed=3).load_state_dict(state)


def test_the_data_fingerprint_sees_any_change_in_the_rows() -> None:
    rows = [Record(query="q", pos=["p"], neg=["n1", "n2"]), Record(query="r", pos=["s"])]
    base = data_fingerprint(rows, ["extra passage"])
    assert data_fingerprint(list(rows), ["extra passage"]) == base
    changed = [Record(query="q", pos=["p"], neg=["n1", "n3"]), rows[1]]
    assert data_fingerprint(changed, ["extra passage"]) != base
    moved = [Record(query="q", pos=["p", "n1"], neg=["n2"]), rows[1]]  # same texts, other roles
    assert data_fingerprint(moved, ["extra passage"]) != base
    assert data_fingerprint(rows, []) != base
