"""What a run carries from step to step and a checkpoint carries over: counters, the logging
window in progress, the best dev score, the log so far; and the trainer state file's content.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from embtune.checkpoint import FINGERPRINT_HAS_SCORES, STATE_FORMAT
from embtune.config import TrainConfig
from embtune.data.batching import Batch
from embtune.data.epoch_plan import EpochPlan
from embtune.errors import UsageError


@dataclass
class Progress:
    """Counters that a checkpoint carries over, so a resumed run logs what the whole run did."""

    texts_seen: int = 0
    train_seconds: float = 0.0
    # The logging window in progress: a resume in mid-window must log the same average.
    window_loss: float = 0.0
    window_steps: int = 0
    window_texts: int = 0
    window_seconds: float = 0.0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    # Sums of the objective's signals over the window, and token positions computed / real.
    window_signals: dict = field(default_factory=dict)
    # Sums of the objective's terms (its named parts of the loss) over the window's steps.
    window_terms: dict = field(default_factory=dict)
    window_padded_tokens: int = 0
    window_real_tokens: int = 0
    # Widest padded query and passage batch of the window: on a GPU a step meeting a batch
    # width for the first time was measured slower (docs/performance.md).
    window_query_width: int = 0
    window_passage_width: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0

    def add_step(self, seconds: float, texts: int, padded: int, real: int, batch: Batch) -> None:
        """Count one step (trained or skipped): time, texts of every process, tokens, widths."""
        self.train_seconds += seconds
        self.texts_seen += texts
        self.window_texts += texts
        self.window_seconds += seconds
        self.window_padded_tokens += padded
        self.window_real_tokens += real
        # The log's names say query and passage; a kind with other parts logs its widest one.
        widths = {name: part.width for name, part in batch.parts.items()}
        query = widths.get("queries", 0)
        passage = widths.get("passages", max(widths.values(), default=0))
        self.window_query_width = max(self.window_query_width, query)
        self.window_passage_width = max(self.window_passage_width, passage)
        self.padded_tokens += padded
        self.real_tokens += real

    def add_signals(
        self, loss: float, signals: dict[str, float], terms: dict[str, float] | None = None
    ) -> None:
        """Add a trained step's loss, signal sums and loss terms to the window."""
        self.nonfinite_in_row = 0
        self.window_loss += loss
        self.window_steps += 1
        for key, value in signals.items():
            self.window_signals[key] = self.window_signals.get(key, 0.0) + value
        for key, value in (terms or {}).items():
            self.window_terms[key] = self.window_terms.get(key, 0.0) + value

    def start_window(self) -> None:
        """Empty the logging window (after it was logged)."""
        self.window_loss, self.window_steps = 0.0, 0
        self.window_texts, self.window_seconds = 0, 0.0
        self.window_signals = {}
        self.window_terms = {}
        self.window_padded_tokens = self.window_real_tokens = 0
        self.window_query_width = self.window_passage_width = 0


@dataclass
class RunState:
    """Where the run is: the first step to train, the log so far, counters, the best dev."""

    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    best: dict = field(default_factory=lambda: {"step": None, "ndcg": None})


def restore_state(
    state: dict | None, checkpoint: Path | None, plan: EpochPlan, total_steps: int
) -> RunState:
    """The run state of a checkpoint's trainer state (a fresh one for None); refused when
    these options would put the run elsewhere (another step count or data position)."""
    if state is None:
        return RunState()
    start_step = int(state["step"])
    position = state.get("position", {})
    per_epoch = plan.steps_per_epoch
    expected = dict(zip(("epoch", "batch"), divmod(start_step, per_epoch), strict=True))
    if (state["steps_per_epoch"], state["total_steps"], position) != (
        per_epoch,
        total_steps,
        expected,
    ):
        raise UsageError(
            f"--resume: {checkpoint} is at step {start_step} of {state['total_steps']} "
            f"({state['steps_per_epoch']} per epoch); these options give {total_steps} "
            f"({per_epoch} per epoch)"
        )
    try:
        plan.sampler.load_state_dict(state["sampler"])
    except ValueError as exc:
        raise UsageError(f"--resume: {checkpoint}: {exc}") from exc
    return RunState(
        start_step=start_step,
        history=list(state["history"]),
        progress=Progress(**state["progress"]),
        best=dict(state["best"]),
    )


def trainer_state(
    done: int,
    run: RunState,
    plan: EpochPlan,
    total_steps: int,
    config: TrainConfig,
    fingerprint: str,
) -> dict:
    """Everything besides model and accelerate state that continuing at ``done`` needs."""
    epoch, batch_index = divmod(done, plan.steps_per_epoch)
    return {
        "format": STATE_FORMAT,
        "step": done,
        "total_steps": total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "global_batch": plan.global_batch,
        "position": {"epoch": epoch, "batch": batch_index},  # the next batch to train
        "sampler": plan.sampler.state_dict(),
        "data_fingerprint": fingerprint,
        FINGERPRINT_HAS_SCORES: True,
        "config": config.to_dict(),
        "progress": asdict(run.progress),
        "best": dict(run.best),
        "history": run.history,  # = train_log.jsonl up to this step
    }
