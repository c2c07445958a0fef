"""The step loop: batch for the step, guarded update, record, log window, dev eval, checkpoint.

It knows nothing about embeddings: the model kind builds the batch, the objective turns the
encoded parts into a loss and signals, the step strategy (training/step.py) encodes and
back-propagates.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from embtune.checkpoint import (
    KILL_AT_STEP_ENV,
    kill_if_requested,
    save_checkpoint,
    signal_if_requested,
)
from embtune.data.batching import Batch
from embtune.distributed import end_distributed
from embtune.errors import TrainingStopped
from embtune.objectives.base import term_values
from embtune.run_files import LOG_FILE
from embtune.training.dev_eval import evaluate_dev, is_dev_step
from embtune.training.session import Session
from embtune.training.state import trainer_state
from embtune.training.step import StepOutput, StepSettings, forward_backward
from embtune.training.stop_signals import StopSignals
from embtune.training.update import finite_everywhere, guarded_update


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else resident memory
    (Linux: VmHWM)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Not ru_maxrss: Linux carries the parent's resident size at spawn into the child's
    # ru_maxrss, so a run started from a 2 GiB process (pytest, `embtune plan`) reported at
    # least 2 GiB whatever it used. VmHWM is the high-water mark of this process's own memory.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, others KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def checkpoint_at(session: Session, done: int) -> Path:
    """Save checkpoint-``done`` (atomically, rotating old ones); returns its folder."""
    state = trainer_state(
        done, session.run, session.plan, session.total_steps, session.config, session.fingerprint
    )
    return save_checkpoint(
        session.accelerator,
        session.model_saver(),
        session.out,
        done,
        state,
        session.config.save_total_limit,
    )


def batch_for_step(session: Session, step: int) -> tuple[int, np.ndarray, Batch]:
    """(epoch, the global batch's rows, this process's share as a batch on the device).

    The main process also counts the global batch's negatives for the coverage figure.
    """
    epoch, rows = session.plan.rows_at(step)
    sampler = session.plan.sampler
    accelerator = session.accelerator
    # Each process takes its share; shares differ by at most one query.
    mine = np.array_split(rows, session.world)[accelerator.process_index]
    groups = [sampler.group(int(r), epoch) for r in mine]
    batch = session.kind.batch(session.encoder, groups, session.texts, session.pad_multiple)
    if session.main:
        local = {g.row: g for g in groups}
        for r in rows.tolist():
            session.coverage.add(local.get(r) or sampler.group(r, epoch))
    return epoch, rows, batch.to(accelerator.device)


def train_step(session: Session, rows: np.ndarray, batch: Batch) -> StepOutput:
    """Forward and backward of one step with the configured strategy."""
    config, accelerator = session.config, session.accelerator
    settings = StepSettings(
        cache_chunk_size=config.cache_chunk_size,
        pad_to_multiple_of=session.pad_multiple,
        negatives_cross_device=config.negatives_cross_device,
        shared_parts=session.kind.shared_parts,
    )
    # DDP averages gradients over processes; weighting by the share of queries makes that
    # average the mean over the global batch when shares differ.
    weight = len(batch.rows) * session.world / len(rows)
    return forward_backward(
        session.model,
        batch,
        session.objective,
        settings,
        accelerator.backward,
        lambda value: finite_everywhere(accelerator, value),
        weight,
        lambda: accelerator.no_sync(session.model),
    )


def record_skip(session: Session, done: int, epoch: int, rows: np.ndarray, problem: str) -> None:
    """Log a skipped step with its rows; stop the run (checkpoint saved) after too many."""
    progress = session.run.progress
    progress.nonfinite_in_row += 1
    progress.skipped_steps += 1
    row_ids = [int(r) for r in rows]
    sources = [session.kind.rows(session.texts)[r].source for r in row_ids]
    session.logbook.write(
        {"step": done, "epoch": epoch, "skipped": problem, "rows": row_ids, "sources": sources}
    )
    if session.show:
        tqdm.write(
            f"step {done}: skipped ({problem}); rows {row_ids} "
            f"(their files and lines are in {LOG_FILE})"
        )
    if progress.nonfinite_in_row >= session.config.max_nonfinite_steps:
        first = done - progress.nonfinite_in_row + 1
        saved = checkpoint_at(session, done)
        end_distributed(session.accelerator)
        raise TrainingStopped(
            f"steps {first}-{done}: {progress.nonfinite_in_row} steps in a row had a "
            f"{problem} and were skipped (rows in {session.out / LOG_FILE}); stopped. "
            f"{saved} holds the model from before the failure (after step "
            f"{first - 1}): use it as --model for a new run with a lower "
            "--learning-rate, a higher --temperature or the listed rows fixed"
        )


def window_sums(session: Session) -> dict[str, float]:
    """The window's signal sums, added over every process."""
    sums = session.run.progress.window_signals
    if session.world > 1:
        keys = sorted(sums)
        accelerator = session.accelerator
        totals = accelerator.reduce(
            torch.tensor([sums[k] for k in keys], device=accelerator.device), reduction="sum"
        )
        sums = dict(zip(keys, totals.tolist(), strict=True))
    return sums


def log_window(session: Session, done: int, epoch: int, bar: tqdm) -> None:
    """Write the logging window's record (means over its steps) and start a new window."""
    progress = session.run.progress
    loss = progress.window_loss / progress.window_steps
    terms = progress.window_terms
    learning_rate = session.scheduler.get_last_lr()[0]
    record = {
        "step": done,
        "epoch": epoch,
        "loss": loss,
        # An objective of several terms logs each, as this process's mean like the loss.
        **{f"loss_{name}": total / progress.window_steps for name, total in terms.items()},
        **session.objective.window_record(window_sums(session), loss),
        "learning_rate": learning_rate,
        "texts_per_second": progress.window_texts / progress.window_seconds,
        "window_texts": progress.window_texts,
        "window_seconds": progress.window_seconds,
        "padding_share": 1 - progress.window_real_tokens / max(progress.window_padded_tokens, 1),
        # A kind without a query part (a cross-encoder: pairs only) logs no query width.
        "query_width": progress.window_query_width or None,
        "passage_width": progress.window_passage_width,
        "peak_memory_bytes": peak_memory_bytes(session.accelerator.device),
    }
    session.logbook.write({k: v for k, v in record.items() if v is not None})
    postfix = {"loss": f"{loss:.4f}"}
    if record.get("chance_loss") is not None:
        postfix["chance"] = f"{record['chance_loss']:.2f}"
    if record.get("accuracy") is not None:
        postfix["acc"] = f"{record['accuracy']:.2f}"
    postfix.update(lr=f"{learning_rate:.2e}", texts_s=f"{record['texts_per_second']:.1f}")
    bar.set_postfix(**postfix)
    progress.start_window()


def stop_for_signal(session: Session, done: int, reason: str, saved: bool) -> None:
    """Checkpoint the run after step ``done`` (unless just saved) and stop it: exit status 3."""
    folder = session.out / f"checkpoint-{done}"
    if not saved:
        folder = checkpoint_at(session, done)
    end_distributed(session.accelerator)
    raise TrainingStopped(
        f"stopped by {reason} after step {done} of {session.total_steps}: {folder} holds the "
        "run; continue it with --resume (same options)"
    )


def run_steps(session: Session) -> None:
    """Train from the run's start step to the last, logging, evaluating and checkpointing;
    a stop signal ends the run after the step it arrives in (training/stop_signals.py)."""
    bar = tqdm(
        total=session.total_steps,
        initial=session.run.start_step,
        desc="training",
        unit="step",
        disable=not session.show,
    )
    try:
        with StopSignals() as signals:
            for step in range(session.run.start_step, session.total_steps):
                done = step + 1
                saved = one_step(session, step, bar)
                reason = signals.requested(session.accelerator)
                if reason and done < session.total_steps:
                    stop_for_signal(session, done, reason, saved)
    finally:
        bar.close()
        session.logbook.close()


def one_step(session: Session, step: int, bar: tqdm) -> bool:
    """Train step ``step`` (0-based) and do what follows it; True when it saved a checkpoint."""
    config = session.config
    progress = session.run.progress
    started = time.perf_counter()
    epoch, rows, batch = batch_for_step(session, step)
    result = train_step(session, rows, batch)
    problem = guarded_update(
        session.accelerator,
        session.model,
        session.optimizer,
        session.scheduler,
        result,
        config,
    )
    done = step + 1
    kill_if_requested(KILL_AT_STEP_ENV, done)
    signal_if_requested(done)
    texts = batch.num_texts * session.world
    seconds = time.perf_counter() - started
    progress.add_step(seconds, texts, result.padded_tokens, result.real_tokens, batch)
    bar.update(1)
    if problem:
        record_skip(session, done, epoch, rows, problem)
    else:
        output = result.output
        progress.add_signals(result.loss.item(), output.signal_sums(), term_values(output))
    if (done % config.logging_steps == 0 or done == session.total_steps) and (
        progress.window_steps
    ):
        log_window(session, done, epoch, bar)
    if is_dev_step(session, done):
        evaluate_dev(session, done)
    if config.save_steps and done % config.save_steps == 0 and done < session.total_steps:
        checkpoint_at(session, done)
        return True
    return False
