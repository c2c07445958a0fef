"""Everything one training run holds once it is prepared: the phases of training/run.py fill
it in order, the step loop (training/loop.py) reads and updates it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embtune.config import TrainConfig
from embtune.data.epoch_plan import EpochPlan
from embtune.data.formats import BeirDataset
from embtune.data.groups import NegativeCoverage, NegativesBudget
from embtune.data.teacher_scores import TeacherDrop
from embtune.kinds.base import Model, ModelKind, Texts
from embtune.objectives.base import Objective
from embtune.training.logbook import Logbook
from embtune.training.reference_sets import ReferenceSet
from embtune.training.sharding import full_state_dict, is_sharded
from embtune.training.state import RunState

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Session:
    """One prepared run."""

    config: TrainConfig
    accelerator: Accelerator
    out: Path
    kind: ModelKind
    encoder: Model  # the kind's model, unwrapped (what is evaluated and saved)
    texts: Texts  # the kind's prepared texts (rows + token tables)
    plan: EpochPlan
    total_steps: int
    run: RunState
    objective: Objective
    pad_multiple: int
    fingerprint: str
    budget: NegativesBudget
    dev_data: BeirDataset | None = None
    show: bool = True
    rejected: list = field(default_factory=list)  # --skip-bad-rows: the rows' problems
    teacher_drop: TeacherDrop | None = None  # what --drop-teacher-false-negatives removed
    references: list[ReferenceSet] = field(default_factory=list)  # --reference-data
    model_lines: list[str] = field(default_factory=list)  # what the kind says before training
    row_prompts: dict | None = None  # what rows' own prompts did (data/pipeline.py)
    model: torch.nn.Module | None = None  # wrapped for training (DDP, ...)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    logbook: Logbook | None = None
    coverage: NegativeCoverage | None = None

    @property
    def main(self) -> bool:
        """True on the process that writes files."""
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        """Processes of the launch."""
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """True under --fsdp: every process holds a shard, so saving and evaluating the model
        need every process (training/sharding.py)."""
        return is_sharded(self.accelerator)

    @property
    def evaluates(self) -> bool:
        """True on the processes that run dev evaluations: the main one, or every one when the
        model is sharded (each forward gathers every process's shard)."""
        return self.main or self.sharded

    def model_saver(self) -> Callable[[Path], None]:
        """``save(folder)``: the model kind's save of the trained model, for the main process.
        Every process must call this (a sharded model's full weights are gathered here)."""
        model = self.accelerator.unwrap_model(self.model)
        state = full_state_dict(self.accelerator, self.model)
        return lambda folder: self.kind.save(model, folder, state)
