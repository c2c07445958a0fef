"""The training run, read top to bottom: :func:`train` is the story, each phase a function.

records -> text stores (tokenized once, cached) -> group sampler -> epoch plan -> batches ->
model kind -> objective -> step strategy -> AdamW step. It runs on accelerate, so the same code
trains on a laptop CPU, one GPU, or many processes under `torchrun` / `accelerate launch`
(each process takes its share of every global batch; gradients are averaged by DDP).

Reliability (docs/reliability.md): every check that can refuse the run happens before the model
is loaded or anything is written (training/preflight.py); checkpoints are atomic and hold all a
run needs to continue exactly (`--resume`); a step with a non-finite loss or gradient is skipped
and logged, and ``--max-nonfinite-steps`` of them in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from embtune.atomic import atomic_write, write_json_atomically
from embtune.checkpoint import (
    exclude_model_from_state,
    is_write_failure,
    load_training_state,
    save_into_folder,
    stopped_writing,
    write_problem,
)
from embtune.config import TrainConfig
from embtune.data.dev_split import save_dev_split
from embtune.data.epoch_plan import EpochPlan, total_steps
from embtune.data.formats import BeirDataset, rejected_row_count, write_rejected_rows
from embtune.data.groups import GroupSampler, NegativeCoverage, NegativesBudget
from embtune.data.pipeline import negatives_budget_for, row_prompt_line, row_prompt_summary
from embtune.data.teacher_scores import teacher_check
from embtune.distributed import end_distributed
from embtune.errors import UsageError
from embtune.hub_upload import push_finished_run
from embtune.kinds import ModelKind, model_kind
from embtune.model_card import card_record
from embtune.objectives.base import Objective
from embtune.run_files import (
    BUDGET_FILE,
    CONFIG_FILE,
    DEV_SPLIT_FILE,
    DIMENSIONS_PLOT,
    LOG_FILE,
    MERGED_DIR,
    REJECTED_FILE,
    SUMMARY_FILE,
    TRAINER_STATE_FILE,
)
from embtune.run_lock import RunLock
from embtune.training.card_facts import final_card, save_with_card
from embtune.training.dev_eval import evaluate_base, needs_base_evaluation
from embtune.training.learning_rate_search import check_search_launch, choose_learning_rate
from embtune.training.logbook import Logbook
from embtune.training.loop import peak_memory_bytes, run_steps
from embtune.training.optim import build_optimizer, linear_schedule
from embtune.training.preflight import (
    Inputs,
    ResumePoint,
    check_disk,
    check_resume,
    load_inputs,
    lock_output_dir,
    prepare_output_dir,
    replace_previous_run,
)
from embtune.training.reference_sets import reference_summary
from embtune.training.session import Session
from embtune.training.sharding import fsdp_plugin, is_sharded, shard_on_cpu
from embtune.training.state import restore_state, trainer_state
from embtune.training.trackers import accelerate_trackers, start_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator

    from embtune.training.interpolation import Interpolation

__all__ = ["LOG_FILE", "TrainResult", "pad_multiple_for", "train"]


@dataclass
class TrainResult:
    """What a finished run reports back to the caller."""

    output_dir: Path
    steps: int
    texts_per_second: float
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    budget: NegativesBudget | None = None
    best_step: int | None = None
    best_ndcg: float | None = None
    resumed_from_step: int = 0  # 0 for a run that started fresh
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    peak_memory_bytes: int = 0  # peak resident (CPU) or allocated (GPU) memory of the run
    negative_coverage: float | None = None  # share of the data's negatives the run used
    interpolation: Interpolation | None = None  # --interpolate-base: the mixed model chosen
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # nDCG@10 base, end
    model_files: list[str] = field(default_factory=list)  # the final save's files (main process)
    hub_url: str | None = None  # --push-to-hub: the upload's commit


def pad_multiple_for(requested: int, device: torch.device) -> int:
    """The multiple batch widths are rounded up to: ``requested``, or for 0 the device's default.

    The GPU default follows the H100 benchmark: a step meeting a batch width for the first time
    took 0.28-3.6 s against 0.17-0.19 s (docs/performance.md); at most 15 extra padding
    positions per text bound the widths a run meets. On a CPU a new width costs nothing
    measurable (bench/shape_cost.py --device cpu), so there it pads to the longest text.
    """
    if requested:
        return requested
    return 16 if device.type == "cuda" else 1


def train(
    config: TrainConfig,
    show_progress: bool = True,
    dev_data: BeirDataset | None = None,
    *,
    objective: Objective | None = None,
    kind_name: str | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.train_data``; the model is saved to output_dir.

    ``dev_data`` (a caller-made dev set, e.g. the demo's) replaces --eval-data/--dev-fraction;
    ``objective`` replaces the model kind's default (InfoNCE for a bi-encoder); ``kind_name``
    names the model kind (embtune.kinds.MODEL_KINDS; default ``config.model_kind``). With --resume /
    --resume-from the run continues from a checkpoint and ends exactly as the uninterrupted run
    would have (same seed: same batches, dropout, updates and log). ``--learning-rate auto``
    first trains one short trial per grid value (training/learning_rate_search.py).
    """
    inputs = load_inputs(config, dev_data)
    if inputs.hub_repo_id:  # --push-to-hub: the repository as OWNER/NAME, for card and upload
        config = dataclasses.replace(config, hub_model_id=inputs.hub_repo_id)
    accelerator = start_accelerator(config, inputs.out)
    kind = model_kind(kind_name or config.model_kind)
    check_search_launch(config, accelerator.num_processes, kind.name, objective)
    lock = RunLock(inputs.out)  # one run per folder, held until the run ends
    try:
        resume = refuse_before_work(config, inputs, accelerator, kind, lock)
        config = choose_learning_rate(config, inputs, resume, kind.name)  # --learning-rate auto
        session = prepare_run(config, inputs, accelerator, kind, resume, show_progress, objective)
        if session.main:
            session.model_lines = kind.announce_lines(session.encoder)
            session.model_lines += kind.prepare_dev(
                config, session.dev_data, session.show, accelerator.device
            )
        announce(session, inputs, resume)
        prepare_model(session)
        restore_training_state(session, resume)
        if needs_base_evaluation(session):
            evaluate_base(session)
        run_steps(session)
        result = finish(session)
        if config.interpolate_base and session.main:
            # Imported here: only runs that mix weights need the merging code.
            from embtune.training.interpolation import interpolate_with_base

            result.interpolation = interpolate_with_base(session)
        if config.push_to_hub and session.main:
            result.hub_url = push_finished_run(
                result.output_dir, result.model_files, config, result.steps
            )
        return result
    finally:
        lock.release()


def start_accelerator(config: TrainConfig, out: Path) -> Accelerator:
    """accelerate's Accelerator for this launch (one process, or one of a torchrun's)."""
    from accelerate import Accelerator

    # Batches change shape every step, which fragments PyTorch's CUDA caching allocator;
    # expandable segments let it grow blocks in place instead of freeing and re-reserving.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    # accelerate keeps one precision per process and refuses another: a second run in the same
    # process (the demo after a bf16 one, the Python API, a test suite) would fail. Its
    # precision state is dropped; the process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    sharding = fsdp_plugin(config)
    accelerator = Accelerator(
        # Without a GPU, accelerate only joins a torchrun launch (gloo) when told it is on CPU;
        # otherwise every process would train alone, each thinking it is the only one.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=accelerate_trackers(config, out),  # --report-to
        project_dir=str(out),
        # Our step count is global (one call per optimizer step); by default accelerate would
        # step the schedule once per process and decay the learning rate N times too fast.
        step_scheduler_with_optimizer=False,
        fsdp_plugin=sharding,
    )
    shard_on_cpu(accelerator, sharding)
    if is_sharded(accelerator) and config.fsdp == "off":
        # Sharded by the launcher (`accelerate launch --use_fsdp`): --fsdp's limits hold too.
        replace(config, fsdp="full_shard").validate()
    if config.fsdp != "off" and accelerator.num_processes == 1 and accelerator.is_main_process:
        print("embtune train: note: --fsdp with one process: nothing to shard; trained whole")
    return accelerator


def refuse_before_work(
    config: TrainConfig, inputs: Inputs, accelerator: Accelerator, kind: ModelKind, lock: RunLock
) -> ResumePoint:
    """The folder's lock (another run there is refused), the resume point, model limits and
    disk checked; then the output folder is made."""
    lock_output_dir(inputs.out, lock, accelerator)
    global_batch = config.batch_size * accelerator.num_processes
    resume = check_resume(config, inputs, accelerator, global_batch)
    kind.check_options(config)
    check_disk(config, inputs.out)
    prepare_output_dir(inputs.out, accelerator, lock)
    return resume


def prepare_run(
    config: TrainConfig,
    inputs: Inputs,
    accelerator: Accelerator,
    kind: ModelKind,
    resume: ResumePoint,
    show_progress: bool,
    objective: Objective | None,
) -> Session:
    """Seed, load the model, prepare texts, plan the epochs, restore the run's counters."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    show = show_progress and accelerator.is_main_process
    world = accelerator.num_processes
    encoder = kind.load(config, resume.checkpoint)
    texts = kind.prepare_texts(encoder, inputs.data, config, show)
    sampler = GroupSampler(
        kind.rows(texts),
        config.train_group_size,
        config.negative_fill,
        kind.passage_count(texts),
        config.seed,
        negative_sampling=config.negative_sampling,
    )
    length_key = kind.length_key(texts) if config.group_by_length else None
    plan = EpochPlan(sampler, config.batch_size * world, world, length_key)
    steps = total_steps(plan.steps_per_epoch, config.epochs, config.max_steps)
    return Session(
        config=config,
        accelerator=accelerator,
        out=inputs.out,
        kind=kind,
        encoder=encoder,
        texts=texts,
        plan=plan,
        total_steps=steps,
        run=restore_state(resume.state, resume.checkpoint, plan, steps),
        objective=objective or kind.objective(config),
        pad_multiple=pad_multiple_for(config.pad_to_multiple_of, accelerator.device),
        fingerprint=resume.fingerprint,
        budget=negatives_budget_for(config, kind.rows(texts), world, kind.in_batch_scoring),
        dev_data=inputs.dev_data,
        show=show,
        rejected=inputs.data.rejected,
        teacher_drop=inputs.teacher_drop,
        references=inputs.references,
        row_prompts=row_prompt_summary(
            inputs.data.records, config.row_prompts, encoder.settings.query_instruction
        ),
    )


def write_config(path: Path, config: TrainConfig) -> None:
    """The run's options as YAML, written atomically (`embtune sweep` trusts this file)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def announce(session: Session, inputs: Inputs, resume: ResumePoint) -> None:
    """Print the negatives budget, its findings and the plan; write the run's setup files."""
    if not session.main:
        return
    config, out, plan = session.config, session.out, session.plan
    replace_previous_run(config, out, resume)
    for line in session.model_lines:
        print(f"embtune train: {line}")
    print("embtune train: negatives budget")
    for line in session.budget.lines():
        print(f"  {line}")
    for finding in session.budget.findings():
        print(f"embtune train: warning: {finding}")
    announce_teacher_scores(inputs)
    if session.row_prompts:
        print(f"  row prompts: {row_prompt_line(session.row_prompts)}")
    print(
        f"  steps: {session.total_steps} ({plan.steps_per_epoch} per epoch, "
        f"{plan.global_batch} queries per step)"
    )
    if session.pad_multiple > 1:
        print(
            f"  batch widths rounded up to a multiple of {session.pad_multiple} "
            "(--pad-to-multiple-of)"
        )
    if resume.checkpoint:
        print(f"  resuming from {resume.checkpoint} at step {session.run.start_step}")
    elif config.resuming:
        print(f"  no checkpoint in {out} yet: starting at step 0")
    try:
        write_config(out / CONFIG_FILE, config)
        write_json_atomically(out / BUDGET_FILE, session.budget.to_json())
        if inputs.dev_rows:
            save_dev_split(out / DEV_SPLIT_FILE, inputs.dev_rows, config.dev_fraction, config.seed)
        announce_bad_rows(inputs, out)
    except OSError as exc:  # before any step: nothing to keep, so a refusal
        raise UsageError(f"--output-dir: cannot write to {out}: {write_problem(exc, out)}") from exc
    if session.dev_data is not None:
        when = f"every {config.eval_steps} steps and " if config.eval_steps else ""
        print(
            f"  dev set: {len(session.dev_data.qrels)} queries over "
            f"{len(session.dev_data.corpus)} passages (evaluated {when}at the end)"
        )


def announce_teacher_scores(inputs: Inputs) -> None:
    """What --drop-teacher-false-negatives removed, and what the teacher still disputes."""
    if inputs.teacher_drop is not None:
        print(f"  {inputs.teacher_drop.line()}")
    check = teacher_check(inputs.data.records)
    for finding in check.findings() if check else ():
        print(f"embtune train: warning: {finding}")


def announce_bad_rows(inputs: Inputs, out: Path) -> None:
    """With --skip-bad-rows: how many rows were left out, and the report listing them."""
    data = inputs.data
    if data.rejected:
        write_rejected_rows(out / REJECTED_FILE, data.rejected)
        print(
            f"embtune train: warning: {rejected_row_count(data.rejected)} bad rows left out "
            f"(--skip-bad-rows); each with its file, line and problem in {out / REJECTED_FILE}"
        )
    if data.ignored_bad_rows:
        print(
            f"embtune train: note: {data.ignored_bad_rows} bad query rows are not used by the "
            "chosen split and were not read"
        )


def prepare_model(session: Session) -> None:
    """The model made ready for training, with its optimizer, schedule, trackers and log."""
    config, accelerator = session.config, session.accelerator
    session.kind.prepare_for_training(session.encoder, config, accelerator.device)
    optimizer = build_optimizer(session.encoder, config)
    warmup = int(config.warmup_ratio * session.total_steps)
    scheduler = linear_schedule(optimizer, warmup, session.total_steps)
    session.model, session.optimizer, session.scheduler = accelerator.prepare(
        session.encoder, optimizer, scheduler
    )
    exclude_model_from_state(accelerator)
    session.model.train()
    session.logbook = Logbook(accelerator, session.run.history, session.out)
    try:
        start_trackers(accelerator, config, session.out, session.run.start_step)
        session.logbook.open(session.run.start_step)
    except OSError as exc:  # before any step: nothing to keep, so a refusal
        problem = write_problem(exc, session.out)
        raise UsageError(f"--output-dir: cannot write to {session.out}: {problem}") from exc


def restore_training_state(session: Session, resume: ResumePoint) -> None:
    """Optimizer, scheduler, loss scaler and every RNG as the checkpoint left them (last before
    the loop), and the negatives coverage of the steps before it."""
    start = session.run.start_step
    if resume.state is not None and resume.checkpoint is not None:
        load_training_state(session.accelerator, resume.checkpoint)
    # Which of the data's negatives the run has trained on (a resumed run replays its past).
    rows = session.kind.rows(session.texts)
    session.coverage = session.plan.coverage_of(start) if start else NegativeCoverage(rows)


def finish(session: Session) -> TrainResult:
    """Save the model and the summary; a finished trainer state marks the run as complete."""
    accelerator, progress, coverage = session.accelerator, session.run.progress, session.coverage
    texts_per_second = (
        progress.texts_seen / progress.train_seconds if progress.train_seconds else 0.0
    )
    peak = peak_memory_bytes(accelerator.device)
    if session.world > 1:
        peak = int(accelerator.reduce(torch.tensor([peak], device=accelerator.device), "max"))
    accelerator.wait_for_everyone()
    save_model = session.model_saver()
    files: list[str] = []
    if session.main:
        try:
            files = write_final_files(session, save_model, texts_per_second, peak)
        except Exception as exc:
            if not is_write_failure(exc, session.out):
                raise
            raise stopped_writing("could not write the final model", exc, session.out) from exc
        write_dimension_plot(session)
    end_distributed(accelerator)
    best = session.run.best
    return TrainResult(
        output_dir=session.out,
        steps=session.total_steps,
        texts_per_second=texts_per_second,
        train_seconds=progress.train_seconds,
        history=session.run.history,
        budget=session.budget,
        best_step=best["step"],
        best_ndcg=best["ndcg"],
        resumed_from_step=session.run.start_step,
        skipped_steps=progress.skipped_steps,
        peak_memory_bytes=peak,
        negative_coverage=coverage.fraction,
        reference=reference_summary(session.run.history, session.references),
        model_files=files,
    )


def write_dimension_plot(session: Session) -> None:
    """With --matryoshka-dims and dev evaluations: dev nDCG@10 against the dimension. Written
    after the run is complete, so a plot that fails only warns."""
    if not session.config.matryoshka_dims:
        return
    from embtune.report import plot_dimensions

    try:
        plot_dimensions(session.run.history, session.out / DIMENSIONS_PLOT)
    except Exception as exc:  # matplotlib's errors have no common type
        print(f"embtune train: could not write {DIMENSIONS_PLOT}: {exc}")


def write_final_files(
    session: Session, save_model: Callable[[Path], None], texts_per_second: float, peak: int
) -> list[str]:
    """The model (``save_model``: :meth:`Session.model_saver`'s) with its card,
    train_summary.json, the closing line and the finished trainer state; returns the files of
    the model's save."""
    out, progress, coverage = session.out, session.run.progress, session.coverage
    card = final_card(session, texts_per_second, peak)  # README.md, in the save
    files = save_into_folder(out, lambda folder: save_with_card(save_model, folder, card))
    if session.config.save_merged_lora_model:
        model = session.accelerator.unwrap_model(session.model)
        merged = out / MERGED_DIR
        save_into_folder(merged, lambda folder: session.kind.save_merged(model, folder))
    padding = 1 - progress.real_tokens / max(progress.padded_tokens, 1)
    summary = {
        "steps": session.total_steps,
        "texts_per_second": texts_per_second,
        "train_seconds": progress.train_seconds,
        "peak_memory_bytes": peak,
        "negative_coverage": coverage.fraction,
        "negatives_used": coverage.used,
        "negatives_total": coverage.total,
        "padding_share": padding,
        "skipped_steps": progress.skipped_steps,
        "best_step": session.run.best["step"],
        "best_dev_ndcg@10": session.run.best["ndcg"],
        "processes": session.world,
    }
    if session.config.skip_bad_rows:
        summary["rejected_rows"] = rejected_row_count(session.rejected)
    if session.teacher_drop is not None:
        summary["teacher_false_negatives_dropped"] = session.teacher_drop.to_json()
    if session.row_prompts:
        summary["row_prompts"] = session.row_prompts
    if session.references:
        summary["reference_ndcg@10"] = reference_summary(session.run.history, session.references)
    summary["model_card"] = card_record(card)
    write_json_atomically(out / SUMMARY_FILE, summary)
    print(
        f"embtune train: {session.total_steps} steps, {texts_per_second:.1f} texts/s, peak "
        f"memory {peak / 2**30:.2f} GiB, padding {padding:.0%} of token positions; negatives "
        f"used: {coverage.used}/{coverage.total} ({coverage.fraction:.0%} of the data's)"
    )
    # Written after the model: its presence says the run finished (--resume refuses then).
    state = trainer_state(
        session.total_steps,
        session.run,
        session.plan,
        session.total_steps,
        session.config,
        session.fingerprint,
    )
    write_json_atomically(out / TRAINER_STATE_FILE, {**state, "finished": True})
    return files
