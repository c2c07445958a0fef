"""What a model kind provides to training: the interface :class:`~embtune.kinds.bi_encoder.
BiEncoder` implements and a cross-encoder or decoder-only embedder would implement next.

``Model`` is the kind's trainable module (an :class:`~embtune.models.encoder.Encoder` for a
bi-encoder) and ``Texts`` its prepared training texts (rows plus token tables); the loop only
passes them between the kind's own methods.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from embtune.config import TrainConfig
from embtune.data.batching import Batch
from embtune.data.formats import BeirDataset, TrainingData
from embtune.data.groups import Group, TrainRow
from embtune.objectives.base import Objective

Model = Any
Texts = Any


class ModelKind(Protocol):
    """A model kind (see the module docstring and docs/architecture.md)."""

    name: str
    shared_parts: tuple[str, ...]  # parts gathered across processes (cross-device negatives)
    in_batch_scoring: bool  # False: a query is scored against its own group only

    def announce_lines(self, model: Model) -> list[str]:
        """What the run prints about the loaded model before training (may be none)."""
        ...

    def prepare_dev(
        self, config: TrainConfig, dev_data: BeirDataset | None, show: bool, device: torch.device
    ) -> list[str]:
        """Whatever dev evaluation needs computed once before training; lines saying what."""
        ...

    def check_options(self, config: TrainConfig) -> None:
        """Refuse options the model cannot take, before any weights are loaded."""
        ...

    def load(self, config: TrainConfig, weights_from: Path | None = None) -> Model:
        """The model to train (from a checkpoint's weights when resuming)."""
        ...

    def prepare_texts(
        self, model: Model, data: TrainingData, config: TrainConfig, show: bool
    ) -> Texts:
        """Rows and token tables of the training data, as this kind encodes them."""
        ...

    def rows(self, texts: Texts) -> list[TrainRow]:
        """The training rows the group sampler draws from."""
        ...

    def passage_count(self, texts: Texts) -> int:
        """Passages the corpus fill may draw from."""
        ...

    def length_key(self, texts: Texts) -> Callable[[Group], int]:
        """A group's length for ``--group-by-length`` (larger = longer)."""
        ...

    def objective(self, config: TrainConfig) -> Objective:
        """The objective the kind trains by default."""
        ...

    def batch(self, model: Model, groups: list[Group], texts: Texts, pad_multiple: int) -> Batch:
        """One step's batch: padded parts in encoding order, and the layout."""
        ...

    def prepare_for_training(self, model: Model, config: TrainConfig, device: torch.device) -> None:
        """Speed and memory measures that keep results, then the model on ``device``."""
        ...

    def evaluate(self, model: Model, dev_data: BeirDataset) -> dict[str, float]:
        """Dev metrics (at least ``ndcg@10`` and ``mrr@10``)."""
        ...

    def save(self, model: Model, path: Path, state_dict: dict | None = None) -> None:
        """The model as the libraries users load it with expect it (``state_dict``: its full
        weights when the model itself is sharded)."""
        ...
