"""Every refusal of a training run, before the model is loaded or anything is written.

Reliability promise (docs/reliability.md): a bad option, bad data, an unusable output folder,
a checkpoint that does not fit these options, a model that cannot take the max lengths or a
disk too small is one clear error (exit 2) with nothing half-written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embtune.checkpoint import (
    FINGERPRINT_HAS_SCORES,
    check_disk_space,
    check_resume_compatible,
    checkpoint_problem,
    data_fingerprint,
    estimate_save_bytes,
    existing_ancestor,
    list_checkpoints,
    read_trainer_state,
    recover_interrupted,
)
from embtune.config import TrainConfig
from embtune.data.dev_split import carve_dev_split, dev_dataset, passage_corpus
from embtune.data.formats import BeirDataset, Record, TrainingData, load_beir, load_training_data
from embtune.data.store import usable_cache_dir
from embtune.data.teacher_scores import (
    TeacherDrop,
    drop_teacher_false_negatives,
    refuse_unscored_rows,
)
from embtune.errors import UsageError
from embtune.hub_upload import check_hub_push
from embtune.run_cleanup import clear_previous_run
from embtune.run_files import (
    CONFIG_FILE,
    LEARNING_RATE_SEARCH_DIR,
    LOCK_FILE,
    TRAINER_STATE_FILE,
)
from embtune.run_lock import FolderBusy, RunLock
from embtune.training.learning_rate_search import saved_learning_rate
from embtune.training.reference_sets import ReferenceSet, load_reference_sets
from embtune.training.trackers import check_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Inputs:
    """The run's validated data, its dev set and output folder."""

    data: TrainingData
    dev_data: BeirDataset | None
    dev_rows: list[Record]  # rows --dev-fraction held out (saved as dev_split.json)
    out: Path
    teacher_drop: TeacherDrop | None = None  # what --drop-teacher-false-negatives removed
    dev_in_memory: bool = False  # the caller's dev set (not read from the options)
    references: list[ReferenceSet] = field(default_factory=list)  # --reference-data
    hub_repo_id: str | None = None  # --push-to-hub: the repository, OWNER/NAME


@dataclass
class ResumePoint:
    """Where a run starts: a checkpoint and its trainer state, or (None, None) = fresh."""

    checkpoint: Path | None
    state: dict | None
    fingerprint: str  # of the training data (checked against a resumed checkpoint's)


def load_inputs(config: TrainConfig, dev_data: BeirDataset | None) -> Inputs:
    """Options (with the --report-to packages and what --push-to-hub needs), data and the dev
    set checked; ``dev_data`` (a caller's, e.g. the demo's) replaces --eval-data /
    --dev-fraction."""
    in_memory = dev_data is not None
    config.validate()
    check_trackers(config)  # --report-to: a missing package, now rather than never
    hub_repo_id = check_hub_push(config)
    has_dev = in_memory or config.eval_data or config.dev_fraction
    if config.learning_rate == "auto" and not has_dev:
        raise UsageError(
            "--learning-rate auto chooses the rate on a dev set: give --eval-data DIR (a BEIR "
            "folder) or --dev-fraction F, or pass a number"
        )
    if config.fp16 and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU; on CPU train in fp32 (or --bf16)")
    warn_emulated_bf16(config)
    skip = config.skip_bad_rows
    data = load_training_data(config.train_data, config.train_split, skip_bad_rows=skip)
    dev_rows: list[Record] = []
    if config.dev_fraction and dev_data is None:
        data.records, dev_rows = carve_dev_split(data.records, config.dev_fraction, config.seed)
        dev_data = dev_dataset(dev_rows, data.corpus or passage_corpus(data.records + dev_rows))
    elif config.eval_data and dev_data is None:
        dev_data = load_beir(Path(config.eval_data), config.eval_split, skip_bad_rows=skip)
    if config.save_best and dev_data is None:
        raise UsageError("--save-best needs a dev set: --eval-data DIR or --dev-fraction F")
    references = load_reference_sets(config.reference_data, config.reference_split)
    if config.interpolate_base == "auto" and dev_data is None:
        raise UsageError(
            "--interpolate-base auto chooses the factor on dev: give --eval-data DIR or "
            "--dev-fraction F (or a fixed factor, --interpolate-base 0.5)"
        )
    out = check_output_dir(config)
    usable_cache_dir(config.cache_dir)  # a read-only or misplaced token cache, refused now
    dropped = check_teacher_scores(config, data)
    return Inputs(data, dev_data, dev_rows, out, dropped, in_memory, references, hub_repo_id)


def warn_emulated_bf16(config: TrainConfig) -> None:
    """--bf16 on a CPU without native bf16 runs, but emulated: say so before the run is slow."""
    from embtune.hardware_plan.measure import native_bf16

    if config.bf16 and not torch.cuda.is_available() and not native_bf16("cpu"):
        print(
            "warning: --bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): matrix "
            "products are emulated, measured about 15x slower than fp32 on an AVX2 CPU "
            "(docs/plan.md); drop --bf16 to train in fp32",
            flush=True,
        )


def check_teacher_scores(config: TrainConfig, data: TrainingData) -> TeacherDrop | None:
    """Distillation's rows all scored (unless allowed); --drop-teacher-false-negatives done."""
    if config.knowledge_distillation and not config.allow_unscored_rows:
        refuse_unscored_rows(data.records)
    if config.drop_teacher_false_negatives is None:
        return None
    data.records, dropped = drop_teacher_false_negatives(
        data.records, config.drop_teacher_false_negatives
    )
    return dropped


def check_output_dir(config: TrainConfig) -> Path:
    """Refuse a folder that cannot be written or holds another run; creates nothing.

    A non-empty folder is accepted with --overwrite-output-dir (a new run replaces the old) or
    --resume (the run continues there).
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {out} exists and is not a folder")
    busy_with = RunLock.holder(out) if out.is_dir() else None
    if busy_with is not None:
        raise UsageError(busy_message(FolderBusy(out, busy_with)))
    if _holds_files(out) and not (config.overwrite_output_dir or config.resuming):
        raise UsageError(
            f"--output-dir: {out} is not empty (a previous run?); pass --overwrite-output-dir "
            "to replace it, --resume to continue it, or choose another folder"
        )
    # The folder is only created once every check has passed; here we ask the nearest existing
    # parent whether it could be.
    where = out if out.is_dir() else existing_ancestor(out)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir: cannot write to {out} ({where} is not writable)")
    return out


def _holds_files(out: Path, besides: tuple[str, ...] = ()) -> bool:
    """True when ``out`` is a folder with anything in it besides the run lock (and ``besides``)."""
    return out.is_dir() and any(p.name not in (LOCK_FILE, *besides) for p in out.iterdir())


def busy_message(busy: FolderBusy) -> str:
    """The one line a run gets when another live run holds its output folder."""
    return (
        f"--output-dir: {busy}; wait for it to finish, or choose another folder "
        "(a second run would mix its checkpoints and logs with the first's)"
    )


def lock_output_dir(out: Path, lock: RunLock, accelerator: Accelerator) -> None:
    """Take the folder's lock (main process) once the folder exists; every process refuses
    together when another run holds it. A no-op before the folder exists or once held."""
    refused = None
    if accelerator.is_main_process and out.is_dir() and not lock.held:
        try:
            note = lock.acquire()
        except FolderBusy as exc:
            refused = busy_message(exc)
        else:
            if note:
                print(f"embtune train: {out}: {note}")
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if refused else 0.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() and refused is None:
            refused = f"--output-dir: {out} is in use by another embtune run"
    if refused:
        raise UsageError(refused)


def create_output_dir(out: Path) -> None:
    """Create ``out`` and prove a file can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".embtune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--output-dir: cannot write to {out}: {exc.strerror or exc}") from exc


def _resume_checkpoint(
    config: TrainConfig, out: Path, processes: int
) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint to continue from, its trainer state and notes to print; (None, None, [])
    to start fresh. Every candidate is verified (its files against the sizes and checksums it
    was saved with): --resume takes the newest intact one, --resume-from refuses a damaged one.
    """
    if config.resume_from:
        checkpoint = Path(config.resume_from)
        state = read_trainer_state(checkpoint, "--resume-from")
        if state.get("finished"):
            raise UsageError(
                f"--resume-from: {checkpoint} is a finished run ({state['step']} steps), not a "
                "checkpoint; use it as --model to train further"
            )
        problem = checkpoint_problem(checkpoint, state, processes)
        if problem:
            intact = _newest_intact(checkpoint.parent, processes, [])
            other = f"; {intact[0]} is intact" if intact and intact[0] != checkpoint else ""
            raise UsageError(f"--resume-from: {checkpoint} is damaged: {problem}{other}")
        return checkpoint, state, []
    if not config.resume:
        return None, None, []
    final = out / TRAINER_STATE_FILE
    if final.is_file():
        state = read_trainer_state(out, "--resume")
        if state.get("finished"):
            raise UsageError(
                f"--resume: {out} holds a finished run ({state['step']} steps); nothing to "
                "resume (--overwrite-output-dir trains it again)"
            )
    notes: list[str] = []
    found = _newest_intact(out, processes, notes)
    if found is None:
        if notes:
            raise UsageError(f"--resume: {out} has no intact checkpoint; {notes[0]}")
        # A run killed during its --learning-rate auto search holds only the search so far.
        search = (LEARNING_RATE_SEARCH_DIR,)
        if _holds_files(out, besides=search) and not (out / CONFIG_FILE).is_file():
            raise UsageError(
                f"--resume: {out} holds files but no embtune run (no {CONFIG_FILE}); "
                "choose the run's folder"
            )
        return None, None, []
    return found[0], found[1], notes


def _newest_intact(out: Path, processes: int, notes: list[str]) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``out`` whose files are intact, with its trainer state; a note
    per damaged one passed over."""
    for checkpoint in reversed(list_checkpoints(out)):
        try:
            state = read_trainer_state(checkpoint, "--resume")
            problem = checkpoint_problem(checkpoint, state, processes)
        except UsageError as exc:
            problem = str(exc).removeprefix("--resume: ")
        if not problem:
            return checkpoint, state
        notes.append(f"{checkpoint.name} is damaged ({problem})")
    return None


def check_resume(
    config: TrainConfig, inputs: Inputs, accelerator: Accelerator, global_batch: int
) -> ResumePoint:
    """The run's starting point; a checkpoint is refused when these options or this launch
    would not continue it exactly. Leftovers of an interrupted save are put right first."""
    out = inputs.out
    if config.resuming and accelerator.is_main_process:
        for line in recover_interrupted(out):
            print(f"embtune train: {out}: {line} (left by an interrupted save)")
    accelerator.wait_for_everyone()
    checkpoint, state, notes = _resume_checkpoint(config, out, accelerator.num_processes)
    if accelerator.is_main_process:
        for note in notes:
            print(f"embtune train: {note}; passed over for {checkpoint.name}")
    records, corpus = inputs.data.records, inputs.data.corpus.values()
    fingerprint = data_fingerprint(records, corpus)
    if state is not None and checkpoint is not None:
        recorded = fingerprint
        if not state.get(FINGERPRINT_HAS_SCORES):
            recorded = data_fingerprint(records, corpus, scores=False)
        if config.learning_rate == "auto":
            # The checkpoint holds the rate the run's search chose; "auto" stands for that one.
            config = replace(config, learning_rate=saved_learning_rate(out) or "auto")
        check_resume_compatible(state, config, checkpoint, recorded)
        if state["global_batch"] != global_batch:
            raise UsageError(
                f"--resume: {checkpoint} was trained with {state['global_batch']} queries per "
                f"step; this launch gives {global_batch} ({accelerator.num_processes} "
                f"processes x --batch-size {config.batch_size}). Launch as many processes as "
                "the run had"
            )
    return ResumePoint(checkpoint, state, fingerprint)


def check_disk(config: TrainConfig, out: Path) -> None:
    """Refuse a disk without room for what the run will save (with --learning-rate auto, its
    trials' models too: each trial keeps its final model)."""
    needed = estimate_save_bytes(config.model, with_optimizer=config.save_steps > 0)
    what = "a checkpoint (model + optimizer state)" if config.save_steps else "the model"
    trials = len(config.learning_rate_grid)
    if config.learning_rate == "auto" and needed is not None:
        needed += trials * (estimate_save_bytes(config.model, with_optimizer=False) or 0)
        what += f" and {trials} --learning-rate auto trial models"
    check_disk_space(out, needed, what)


def prepare_output_dir(out: Path, accelerator: Accelerator, lock: RunLock) -> None:
    """Create the folder (main process) and take its lock if that was not possible before."""
    if accelerator.is_main_process:
        create_output_dir(out)
    lock_output_dir(out, lock, accelerator)
    accelerator.wait_for_everyone()


def replace_previous_run(config: TrainConfig, out: Path, resume: ResumePoint) -> None:
    """For a new run under --overwrite-output-dir (or a --resume that found no checkpoint),
    remove the previous run's files: called once every check has passed, model loaded and
    texts prepared, so a refusal never costs the user the old run."""
    if resume.state is not None or not (config.overwrite_output_dir or config.resuming):
        return
    removed, kept = clear_previous_run(out)
    if removed:
        print(f"embtune train: removed the previous run's {', '.join(removed)} in {out}")
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        files = "file" if len(kept) == 1 else "files"
        print(f"embtune train: kept {len(kept)} {files} embtune did not write: {shown}")
