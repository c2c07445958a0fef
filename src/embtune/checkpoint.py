"""Checkpoints: written atomically, found again after a kill, rotated, and resumed exactly.

A checkpoint is the folder ``OUTPUT/checkpoint-N``, N = optimizer steps done::

    checkpoint-N/
      config.json, model.safetensors,   the model, as Encoder.save writes it: loads in
      tokenizer files, modules.json,    transformers.AutoModel, SentenceTransformer and Encoder
      1_Pooling/, embtune_encoder.json, ...
      training_state/                   accelerate.save_state: optimizer.bin, scheduler.bin,
                                        random_states_<rank>.pkl (python, numpy, torch and CUDA
                                        RNG of each process), scaler.pt (fp16 loss scaler)
      trainer_state.json                step, data position, sampler state, the log so far,
                                        counters, the run's options and data fingerprint;
                                        written last

Everything is written into ``.checkpoint-N.tmp`` and renamed, so a folder named
``checkpoint-N`` is always complete: a kill or a full disk during a save leaves the previous
checkpoints as they were.

Why accelerate's ``save_state`` / ``load_state`` rather than our own ``torch.save``: they already
store the RNG state of every process (python, numpy, torch, CUDA) and the fp16 GradScaler, in the
per-rank layout that DDP needs, and restore them in the right order. Their copy of the model
weights is dropped (the pre-hooks in :func:`exclude_model_from_state`): the model is already in
the checkpoint folder in sentence-transformers layout, and a second copy would double the disk
each checkpoint needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from embtune.config import TrainConfig, flag
from embtune.errors import TrainingStopped, UsageError, shorten
from embtune.file_modes import follow_umask
from embtune.manifest import MANIFEST_KEY, file_manifest, legacy_problem, manifest_problem
from embtune.run_files import TRAINER_STATE_FILE

if TYPE_CHECKING:
    from accelerate import Accelerator

    from embtune.data.formats import Record

CHECKPOINT_PREFIX = "checkpoint-"
STATE_DIR = "training_state"
STATE_FORMAT = 1
# Trainer-state key: True when "data_fingerprint" includes teacher scores. Checkpoints written
# before scores were carried lack it; their fingerprint is the scoreless one, and the data they
# trained on was the same (scores were not used), so they keep resuming.
FINGERPRINT_HAS_SCORES = "data_fingerprint_has_scores"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# What an interrupted save or rotation can leave behind: .checkpoint-12.tmp, .best.old, ...
LEFTOVER_NAME = re.compile(r"\.(checkpoint-\d+|best|interpolated|final)\.(tmp|old|deleting)")

# Test hooks (docs/reliability.md): the process SIGKILLs itself at a chosen point, as an
# out-of-memory killer or a pre-empted cluster job would. Unset in normal use.
KILL_AT_STEP_ENV = "EMBTUNE_TEST_KILL_AT_STEP"
KILL_DURING_SAVE_ENV = "EMBTUNE_TEST_KILL_DURING_SAVE"


# "SIGNAL:STEP[:RANK]", e.g. "SIGTERM:5": the process (only that torchrun rank, if given)
# sends itself that signal during step 5, as a scheduler pre-empting the job would.
SIGNAL_AT_STEP_ENV = "EMBTUNE_TEST_SIGNAL_AT_STEP"


def kill_if_requested(env: str, step: int) -> None:
    """Test hook: SIGKILL this process when the environment variable ``env`` equals ``step``."""
    if os.environ.get(env) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def signal_if_requested(step: int) -> None:
    """Test hook: send this process the signal :data:`SIGNAL_AT_STEP_ENV` names at its step."""
    name, at, rank = (os.environ.get(SIGNAL_AT_STEP_ENV, "").split(":") + ["", ""])[:3]
    if name and at == str(step) and rank in ("", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.Signals[name])


# --- finding checkpoints -----------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in a run folder, oldest first."""
    if not out.is_dir():
        return []
    found = [
        (step, path)
        for path in out.iterdir()
        if (step := checkpoint_step(path)) is not None and (path / TRAINER_STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in a run folder, or None."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def read_trainer_state(folder: Path, option: str = "--resume-from") -> dict:
    """A checkpoint's ``trainer_state.json``; UsageError (naming ``option``) when unusable."""
    path = folder / TRAINER_STATE_FILE
    if not folder.is_dir():
        raise UsageError(f"{option}: {folder} does not exist or is not a folder")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(
            f"{option}: {folder} is not an embtune checkpoint (no {TRAINER_STATE_FILE})"
        ) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option}: {path} is unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise UsageError(
            f"{option}: {path} has state format {found!r}; this embtune reads {STATE_FORMAT}"
        )
    if not state.get("finished") and not (folder / STATE_DIR).is_dir():
        raise UsageError(f"{option}: {folder} has no {STATE_DIR}/ (optimizer, RNG states)")
    for key, kind in _STATE_KEYS.items():
        value = state.get(key)
        if key not in state:
            raise UsageError(f"{option}: {path}: key '{key}' is missing (a damaged checkpoint)")
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            what = "a whole number >= 0" if kind is int else f"a {kind.__name__}"
            raise UsageError(f"{option}: {path}: '{key}' must be {what}, got {shorten(value)}")
    return state


# The keys a resume reads, with their types: a state without one is refused in one line, not
# with a KeyError halfway through restoring.
_STATE_KEYS: dict[str, type] = {
    "step": int,
    "total_steps": int,
    "steps_per_epoch": int,
    "global_batch": int,
    "sampler": dict,
    "data_fingerprint": str,
    "config": dict,
    "progress": dict,
    "best": dict,
    "history": list,
}


def checkpoint_problem(checkpoint: Path, state: dict, processes: int) -> str | None:
    """What makes ``checkpoint`` unfit to resume from (a file missing, truncated or changed
    since it was saved, an RNG state missing for a process of this launch), or None."""
    required = [f"{STATE_DIR}/random_states_{rank}.pkl" for rank in range(processes)]
    missing = next((name for name in required if not (checkpoint / name).is_file()), None)
    if missing:
        return f"{missing}: missing (the resume would not be exact)"
    if MANIFEST_KEY in state:
        return manifest_problem(checkpoint, state[MANIFEST_KEY])
    weights = [p.name for p in checkpoint.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    model = weights[0] if weights else "model.safetensors"
    state_files = [f"{STATE_DIR}/{name}" for name in ("optimizer.bin", "scheduler.bin")]
    return legacy_problem(checkpoint, [model, *state_files, *required])


# --- writing -----------------------------------------------------------------------------------


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk.

    A rename is atomic against a killed process as is; the flush makes it so against a power
    loss too (the new name must not appear before the data it names).
    """
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an existing ``target`` is swapped out, then deleted."""
    if target.exists():
        # Two renames: killed between them, `.NAME.old` is put back by recover_interrupted().
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
        _fsync_dir(target.parent)


def save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via ``write(tmp)`` then rename it, so a kill never leaves half a folder."""
    tmp = target.with_name(f".{target.name}.tmp")
    _write_temporary(tmp, write)
    _replace_dir(tmp, target)


def _write_temporary(tmp: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh temporary folder, its modes set by the umask
    (embtune/file_modes.py), and flush it; on any error the folder is removed (a full disk
    gets its space back) and the error raised."""
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        follow_umask(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted(out: Path) -> list[str]:
    """Undo what a kill during a save or rotation left in ``out``; returns what was done.

    Temporary and half-deleted folders are removed; a folder moved aside for replacement
    (``.best.old``) is put back when its replacement never arrived.
    """
    done: list[str] = []
    if not out.is_dir():
        return done
    for path in sorted(out.iterdir()):
        match = LEFTOVER_NAME.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        target = out / match.group(1)
        if match.group(2) == "old" and not target.exists():
            os.replace(path, target)
            done.append(f"restored {target.name} from {path.name}")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path.name}")
    return done


def rotate_checkpoints(out: Path, keep: int, current_step: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints up to ``current_step`` (0 keeps all).

    Checkpoints after ``current_step`` (left by a run resumed from an earlier one) are not
    counted: the one just written must never be the one deleted.
    """
    if keep <= 0:
        return []
    mine = [p for p in list_checkpoints(out) if (checkpoint_step(p) or 0) <= current_step]
    doomed = mine[:-keep]
    for path in doomed:
        # Renamed first: a kill mid-delete must not leave half a folder under a checkpoint name.
        trash = path.with_name(f".{path.name}.deleting")
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


def exclude_model_from_state(accelerator: Accelerator) -> None:
    """Make save_state/load_state skip the model weights (the checkpoint folder holds them)."""

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def skip_models(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(skip_models)


def save_checkpoint(
    accelerator: Accelerator,
    save_model: Callable[[Path], None],
    out: Path,
    step: int,
    trainer_state: dict,
    keep: int = 0,
) -> Path:
    """Write ``out/checkpoint-<step>`` atomically, then rotate; every process must call this.

    ``save_model(folder)`` writes the model (the model kind's save, main process only) and goes
    first, the accelerate state (optimizer, scheduler, scaler, RNG of every
    process) second, ``trainer_state.json`` last, and only then is the folder renamed into place.
    A full disk removes the partial folder and stops the run with TrainingStopped.
    """
    target = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{target.name}.tmp"
    main = accelerator.is_main_process
    try:
        accelerator.wait_for_everyone()
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            save_model(tmp)
            kill_if_requested(KILL_DURING_SAVE_ENV, step)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / STATE_DIR))
        accelerator.wait_for_everyone()
        if main:
            # Last, with every other file's size and checksum: a resume verifies them.
            listed = {**trainer_state, MANIFEST_KEY: file_manifest(tmp)}
            with open(tmp / TRAINER_STATE_FILE, "w", encoding="utf-8") as fh:
                json.dump(listed, fh, indent=1)
            follow_umask(tmp)  # safetensors wrote the weights private (0600)
            fsync_tree(tmp)
            _replace_dir(tmp, target)
            rotate_checkpoints(out, keep, step)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(exc, out):
            raise
        raise stopped_writing(f"step {step}: could not write {target.name}", exc, out) from exc
    accelerator.wait_for_everyone()
    return target


def save_into_folder(out: Path, write: Callable[[Path], None]) -> list[str]:
    """Write files into ``out`` (beside files that are not ours) without leaving partial ones:
    ``write`` fills ``.final.tmp``, then each file is renamed into place. A failed write leaves
    ``out`` as it was (the temporary folder removed); a kill between renames leaves whole
    files only, and the run, not marked finished, resumes from its last checkpoint. Returns
    the files written, relative to ``out`` (``1_Pooling/config.json``)."""
    tmp = out / ".final.tmp"
    _write_temporary(tmp, write)
    written = []
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        name = path.relative_to(tmp)
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        written.append(name.as_posix())
    shutil.rmtree(tmp)
    _fsync_dir(out)
    return written


# What a full disk raises: OSError from open/write, RuntimeError from torch.save's zip writer
# ("unexpected pos"), SafetensorError from safetensors, and a bare Exception from the Rust
# tokenizers' save ("No space left on device (os error 28)"). A save catching OSError crashed.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def is_write_failure(exc: BaseException, folder: Path) -> bool:
    """True when ``exc`` is a write that failed for the disk (not a bug to show as one)."""
    if isinstance(exc, WRITE_ERRORS):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


_NEARLY_FULL = 64 * 2**20  # free bytes below which a failed write is taken for a full disk


def write_problem(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in words: "the disk is full" when it is, else the error's text."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    try:
        free = shutil.disk_usage(existing_ancestor(folder)).free
    except OSError:
        free = None
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0] or repr(exc)
    if free is not None and free < _NEARLY_FULL:
        return f"the disk is full ({human_bytes(free)} free; {reason})"
    return reason


def stopped_writing(what: str, exc: BaseException, out: Path) -> TrainingStopped:
    """The stop (exit 3) for a write that failed mid-run: what failed, why, which checkpoint
    holds the work, and how to go on."""
    previous = list_checkpoints(out)
    kept = f"{previous[-1]} is intact" if previous else "no checkpoint was written yet"
    return TrainingStopped(
        f"{what}: {write_problem(exc, out)}; {kept}. Free disk space and run again with --resume"
    )


def load_training_state(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore optimizer, scheduler, fp16 scaler and every RNG from a checkpoint.

    Call it last before the first step: anything drawing random numbers after it would shift
    the sequence the uninterrupted run saw.
    """
    accelerator.load_state(str(checkpoint / STATE_DIR))


# --- resuming safely ---------------------------------------------------------------------------


def data_fingerprint(
    records: Iterable[Record], corpus: Iterable[str] = (), scores: bool = True
) -> str:
    """A hash of the training rows and extra corpus: resuming on other data would be silent.

    Teacher scores count when a record has them; a record without them hashes as it did before
    scores were part of the hash, so checkpoints of such data still resume. ``scores=False``
    gives the hash checkpoints recorded before scores counted (trainer states without
    :data:`FINGERPRINT_HAS_SCORES`), so those resume on scored data too.
    """
    digest = hashlib.sha256()
    for rec in records:
        fields_ = [rec.query, rec.prompt or "", *rec.pos, "\x1d", *rec.neg]
        if scores and (rec.pos_scores is not None or rec.neg_scores is not None):
            fields_ += ["\x1d", _scores_text(rec.pos_scores), _scores_text(rec.neg_scores)]
        digest.update("\x1f".join(fields_).encode("utf-8", "surrogatepass") + b"\x1e")
    digest.update(b"\x1c")
    for text in corpus:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x1e")
    return digest.hexdigest()


def _scores_text(scores: list[float] | None) -> str:
    # repr of a float round-trips exactly, so any change of a score changes the text; "-" keeps
    # "no scores" apart from an empty list.
    return "-" if scores is None else " ".join(repr(float(s)) for s in scores)


def check_resume_compatible(
    state: dict, config: TrainConfig, checkpoint: Path, fingerprint: str
) -> None:
    """Refuse to continue a checkpoint under options or data that change what is trained.

    Options marked ``resume_may_change`` in TrainConfig (logging, saving, evaluation, paths) may
    differ; the rest decide the exact sequence of batches and updates.
    """
    saved = state.get("config") or {}
    differ = []
    for f in fields(TrainConfig):
        if f.metadata.get("resume_may_change") or f.name not in saved:
            continue
        now = getattr(config, f.name)
        if saved[f.name] != now:
            differ.append(f"{flag(f.name)} {shorten(now)} (was {shorten(saved[f.name])})")
    if differ:
        raise UsageError(
            f"--resume: {checkpoint} was trained with other options: {'; '.join(differ)}. "
            "Resume with the run's options, or start a new run in another folder"
        )
    if state.get("data_fingerprint") != fingerprint:
        raise UsageError(
            f"--resume: the training data differs from the data {checkpoint} was trained on "
            "(rows or texts changed); resume on the same data, or start a new run"
        )


# --- disk space --------------------------------------------------------------------------------


def _model_folder(name_or_path: str) -> Path | None:
    local = Path(name_or_path)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not downloaded yet, or no such repo: the size is unknown
        return None


def estimate_save_bytes(model: str, with_optimizer: bool) -> int | None:
    """Estimated bytes of one save: the model's weights and other files, plus AdamW's state.

    AdamW keeps two moments per weight in the weight's dtype, so a checkpoint is about three
    times the weight files plus the tokenizer. None when the model's files are not on disk.
    """
    folder = _model_folder(model)
    if folder is None:
        return None
    weights = other = 0
    for path in folder.iterdir():
        if path.is_file():
            size = path.stat().st_size
            if path.suffix in WEIGHT_SUFFIXES:
                weights += size
            else:
                other += size
    return weights * (3 if with_optimizer else 1) + other


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (where a new folder would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(out: Path, needed: int | None, what: str) -> None:
    """UsageError when the disk holding ``out`` has less than ``needed`` bytes free."""
    if needed is None:
        return
    free = shutil.disk_usage(existing_ancestor(out)).free
    if free < needed:
        raise UsageError(
            f"--output-dir: {human_bytes(free)} free on the disk of {out}, but {what} needs "
            f"about {human_bytes(needed)}; free space or choose a folder on another disk"
        )
