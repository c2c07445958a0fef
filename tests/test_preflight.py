"""Up-front checks: every refusal comes before the model is loaded or anything is written,
as one line with exit status 2."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from embtune.checkpoint import estimate_save_bytes, human_bytes, list_checkpoints
from embtune.cli import build_parser, main
from embtune.config import resolve_config
from embtune.models.encoder import Encoder
from embtune.training.run import LOG_FILE
from tests.conftest import single_thread
from tests.test_train_integration import _tiny_beir


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _tiny_beir(tmp_path / "beir")


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
        "--batch-size", "4", "--train-group-size", "3", "--max-steps", "2",
        "--logging-steps", "1", "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def refusal(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """The one error line of a run that must be refused with exit status 2."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("embtune train: error: ")


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the weights are loaded: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the up-front checks finished")

    monkeypatch.setattr(Encoder, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--train-group-size", "0"], "--train-group-size must be at least 1, got 0"),
        (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
        (["--temperature", "-0.1"], "--temperature must be a positive number, got -0.1"),
        (
            ["--passage-max-len", "1024"],
            "--passage-max-len: 1024 is outside 1..512 (the model's position limit)",
        ),
        (
            ["--query-max-len", "513"],
            "--query-max-len: 513 is outside 1..512 (the model's position limit)",
        ),
        (
            ["--resume", "--overwrite"],
            "--resume and --overwrite-output-dir exclude each other: resume continues the run "
            "in --output-dir, overwrite replaces it",
        ),
        (["--save-total-limit", "-1"], "--save-total-limit must not be negative, got -1"),
        (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be at least 1, got 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--model", "./no-such-model"], "--model: folder ./no-such-model does not exist"),
        (["--resume-from", "./no-such-checkpoint"], "--resume-from: no-such-checkpoint does"),
    ],
    ids=lambda x: x if isinstance(x, str) else " ".join(x),
)
def test_inconsistent_options_are_refused_before_any_work(
    tiny_model: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_loading: None,
    extra: list[str],
    expected: str,
) -> None:
    out = tmp_path / "run"
    assert refusal(capsys, argv(tiny_model, data, out, *extra)).startswith(expected)
    assert not out.exists()


def test_an_output_path_that_is_a_file(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.write_text("x")
    assert refusal(capsys, argv(tiny_model, data, out)) == (
        f"--output-dir: {out} exists and is not a folder"
    )


def test_an_output_folder_under_a_file_cannot_be_created(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    message = refusal(capsys, argv(tiny_model, data, out))
    assert message.startswith(f"--output-dir: cannot write to {out}"), message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_folder(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        message = refusal(capsys, argv(tiny_model, data, parent / "run"))
    finally:
        parent.chmod(0o755)
    assert message.startswith("--output-dir: cannot write to"), message


def test_a_previous_run_is_not_overwritten_by_accident(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOG_FILE).write_text("{}\n")
    message = refusal(capsys, argv(tiny_model, data, out))
    assert "--overwrite-output-dir" in message and "--resume" in message
    assert (out / LOG_FILE).read_text() == "{}\n"


def test_overwrite_replaces_the_previous_run(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with single_thread():
        assert main(argv(tiny_model, data, out, "--save-steps", "1", "--max-steps", "3")) == 0
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
        (out / "notes.txt").write_text("mine")
        assert main(argv(tiny_model, data, out, "--overwrite", "--save-steps", "0")) == 0
    # The old run's checkpoints would otherwise be "the newest" for a later --resume.
    assert list_checkpoints(out) == []
    assert len((out / LOG_FILE).read_text().splitlines()) == 2
    assert (out / "notes.txt").read_text() == "mine"  # files embtune did not write stay


def test_overwrite_is_an_alias_also_in_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("overwrite: true\n")
    args = ["train", "--config", str(cfg), "--model", "m", "--train-data", "t", "-o", "o"]
    assert resolve_config(build_parser().parse_args(args)).overwrite_output_dir is True
    args = ["train", "--model", "m", "--train-data", "t", "-o", "o", "--overwrite"]
    assert resolve_config(build_parser().parse_args(args)).overwrite_output_dir is True


def test_not_enough_disk_for_a_checkpoint(
    tiny_model: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_model_loading: None,
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    out = tmp_path / "run"
    message = refusal(capsys, argv(tiny_model, data, out, "--save-steps", "1"))
    needed = estimate_save_bytes(str(tiny_model), with_optimizer=True)
    assert message == (
        f"--output-dir: {human_bytes(10**6)} free on the disk of {out}, but a checkpoint "
        f"(model + optimizer state) needs about {human_bytes(needed)}; free space or choose a "
        "folder on another disk"
    )
    assert not out.exists()


def test_the_checkpoint_estimate_counts_weights_three_times(tiny_model: Path) -> None:
    weights = (tiny_model / "model.safetensors").stat().st_size
    rest = sum(p.stat().st_size for p in tiny_model.iterdir() if p.suffix != ".safetensors")
    assert estimate_save_bytes(str(tiny_model), with_optimizer=True) == 3 * weights + rest
    assert estimate_save_bytes(str(tiny_model), with_optimizer=False) == weights + rest
    assert estimate_save_bytes("no/such-model-anywhere", with_optimizer=True) is None
    assert human_bytes(1536) == "1.5 KB" and human_bytes(12) == "12 B"


def test_overwrite_removes_only_what_embtune_wrote(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    extra = ("--save-steps", "2", "--max-steps", "4", "--eval-data", str(data))
    with single_thread():
        assert (
            main(argv(tiny_model, data, out, *extra, "--eval-split", "train", "--save-best")) == 0
        )
    # The user's own files: a note in best/, a hand-copied checkpoint folder, a hidden backup.
    (out / "best" / "keep.txt").write_text("mine")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "weights.bin").write_text("mine")
    (out / ".notes.old").write_text("mine")
    (out / "tensorboard" / "my-plot.png").write_text("mine")
    capsys.readouterr()
    with single_thread():
        assert main(argv(tiny_model, data, out, "--overwrite", "--save-steps", "0")) == 0
    printed = capsys.readouterr().out
    assert "removed the previous run's best, checkpoint-2, tensorboard" in printed
    assert "kept 2 files embtune did not write: best/keep.txt, tensorboard/my-plot.png" in printed
    assert (out / "best" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "best").iterdir()) == ["keep.txt"]
    assert (out / "checkpoint-7" / "weights.bin").read_text() == "mine"
    assert (out / ".notes.old").read_text() == "mine"
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()


@pytest.mark.parametrize("where", ["read-only", "under-a-file"])
def test_an_unusable_token_cache_is_refused_before_any_work(
    tiny_model: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"
    if where == "read-only":
        cache = tmp_path / "ro"
        cache.mkdir()
        real_mkstemp = __import__("tempfile").mkstemp

        def refuse(*args, **kwargs):  # root ignores permission bits: a read-only mount's error
            if str(kwargs.get("dir", "")).startswith(str(cache)):
                raise OSError(30, "Read-only file system")
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setenv("EMBTUNE_CACHE", str(cache))
    out = tmp_path / "run"
    args = argv(tiny_model, data, out)
    args.remove("--cache-dir")
    args.remove(str(out.parent / "cache"))
    message = refusal(capsys, args)
    assert "EMBTUNE_CACHE" in message and str(cache) in message
    assert not out.exists()


def test_overwrite_keeps_the_previous_run_when_a_later_check_refuses(
    tiny_model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old run is removed only once everything passed: here the model cannot be loaded
    with the attention kernel asked for, which is found out after the folder checks."""
    out = tmp_path / "run"
    with single_thread():
        assert main(argv(tiny_model, data, out, "--save-steps", "1")) == 0
    before = sorted(p.name for p in out.iterdir())
    bad = argv(tiny_model, data, out, "--overwrite", "--attn-implementation", "flash_attention_2")
    assert main(bad) == 2
    assert "--attn-implementation flash_attention_2" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
