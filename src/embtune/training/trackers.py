"""``--report-to``: where the run's log goes besides train_log.jsonl, through accelerate's
trackers (``Accelerator(log_with=accelerate_trackers(...))``); HF Trainer's option's name.

- ``tensorboard`` (the default): event files in OUTPUT_DIR/tensorboard; a resumed run hides
  the events the interrupted run logged after its checkpoint.
- ``wandb``: a run named after the output folder in project ``$WANDB_PROJECT`` (default
  ``embtune``), its local files in OUTPUT_DIR/wandb; ``WANDB_MODE=offline`` needs no account.
- ``mlflow``: a run named after the output folder in experiment ``$MLFLOW_EXPERIMENT_NAME``
  (default ``embtune``) of ``$MLFLOW_TRACKING_URI``. MLflow refuses ``@`` in metric names, so
  ``dev_ndcg@10`` is logged there as ``dev_ndcg_at_10``.
- ``none``: train_log.jsonl only.

A tracker whose package is missing is refused before any work (:func:`check_trackers`):
accelerate itself would silently drop it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embtune.config import TrainConfig
from embtune.errors import UsageError
from embtune.run_files import TENSORBOARD_DIR

if TYPE_CHECKING:
    from accelerate import Accelerator

PROJECT = "embtune"  # the wandb project and MLflow experiment unless their variables say


def chosen_trackers(config: TrainConfig) -> list[str]:
    """The trackers --report-to names, each once, in order ([] for none)."""
    return [name for name in dict.fromkeys(config.report_to) if name != "none"]


def _availability() -> dict[str, Callable[[], bool]]:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }


def check_trackers(config: TrainConfig) -> None:
    """Refuse a --report-to tracker whose package is not installed, naming the install."""
    available = _availability()
    for name in chosen_trackers(config):
        if not available[name]():
            raise UsageError(
                f"--report-to {name}: the {name} package is not installed (pip install {name})"
            )


def accelerate_trackers(config: TrainConfig, out: Path) -> list[Any] | None:
    """What ``Accelerator(log_with=...)`` gets: tracker names, or trackers made here where
    accelerate's own would be named after the TensorBoard folder (wandb, MLflow)."""
    made: list[Any] = []
    for name in chosen_trackers(config):
        if name == "tensorboard":
            made.append(name)  # its folder: project_dir / the project name (TENSORBOARD_DIR)
        elif name == "wandb":
            from accelerate.tracking import WandBTracker

            project = os.environ.get("WANDB_PROJECT") or PROJECT
            made.append(WandBTracker(project, name=out.name, dir=str(out)))
        elif name == "mlflow":
            made.append(_mlflow_tracker(out.name))
    return made or None


def _mlflow_tracker(run_name: str) -> Any:
    from accelerate.tracking import MLflowTracker

    class MLflowMetrics(MLflowTracker):
        """accelerate's MLflow tracker, with metric names MLflow accepts."""

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            super().log({mlflow_name(k): v for k, v in values.items()}, step=step, **kwargs)

    # accelerate lets $MLFLOW_EXPERIMENT_NAME replace the experiment given here.
    return MLflowMetrics(experiment_name=PROJECT, run_name=run_name)


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts: ``dev_ndcg@10`` -> ``dev_ndcg_at_10`` (MLflow allows
    letters, digits, ``_ - . : /`` and spaces)."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def start_trackers(accelerator: Accelerator, config: TrainConfig, out: Path, start: int) -> None:
    """Start the --report-to trackers with the run's options; a resumed run's TensorBoard
    hides the events the interrupted run logged after its checkpoint. A tracker that cannot
    start (wandb without a login, an unreachable MLflow server) refuses the run, before any
    step, in one line."""
    from embtune.training.logbook import wait_for_a_later_events_file

    names = chosen_trackers(config)
    if not names:
        return
    options = {"tensorboard": {"purge_step": start + 1}} if start else {}
    if start and "tensorboard" in names:
        wait_for_a_later_events_file(out / TENSORBOARD_DIR)
    try:
        accelerator.init_trackers(
            TENSORBOARD_DIR,
            config={k: str(v) for k, v in config.to_dict().items()},
            init_kwargs=options,
        )
    except OSError:
        raise  # a disk that cannot be written: the caller says so
    except Exception as exc:  # each tracker library has its own errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise UsageError(
            f"--report-to {' '.join(names)}: a tracker did not start: {reason}"
        ) from exc
