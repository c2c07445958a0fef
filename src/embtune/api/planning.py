"""`embtune plan` as a function: measure what the machine affords, recommend the settings."""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embtune.api.options import (
    PathLike,
    choice,
    int_option,
    optional_float,
    output_file,
    path_list,
)
from embtune.config import TrainConfig
from embtune.errors import UsageError
from embtune.hardware_plan.memory_budget import parse_size
from embtune.hardware_plan.recommend import GIB, Recommendation

_TRAIN = TrainConfig()
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("cpu", "cuda")


@dataclass
class PlanResult:
    """The measured grid, the fitted line, the recommendation and the printed report."""

    recommendation: Recommendation
    measurements: list = field(default_factory=list)  # hardware_plan.measure.Measurement
    fit: object = None  # hardware_plan.memory_fit.LinearFit
    device: str = "cpu"
    device_name: str = ""
    text: str = ""
    options: dict = field(default_factory=dict)  # the recommended `embtune train` options

    def to_json(self) -> dict:
        """The plan as plain data (what --json writes)."""
        return {
            "device": self.device,
            "device_name": self.device_name,
            "budget_bytes": self.recommendation.budget,
            "recommended": self.options,
            "predicted_peak_bytes": self.recommendation.predicted_peak,
            "extrapolated": self.recommendation.extrapolated,
            "reasons": self.recommendation.reasons,
            "fit": asdict(self.fit) if self.fit is not None else None,
            "measurements": [
                {
                    **asdict(m.point),
                    "texts": m.point.texts,
                    "peak_bytes": m.peak_bytes,
                    "texts_per_second": m.texts_per_second,
                    "seconds": m.seconds,
                    "error": m.error,
                }
                for m in self.measurements
            ],  # fmt: skip
        }


def device_name(device: str) -> str:
    """The measuring device in words (GPU name, or CPU model and core count)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {len(os.sched_getaffinity(0))} cores, {torch.backends.cpu.get_cpu_capability()}"
    )


def _check_device(device: str | None) -> str:
    import torch

    device = choice(device, "--device", DEVICES) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    return device


def plan(
    model: PathLike,
    train_data: PathLike | Sequence[PathLike],
    *,
    memory_budget: str | int | None = None,
    headroom: float | str = 0.1,
    device: str | None = None,
    train_group_size: int | str = _TRAIN.train_group_size,
    batch_size: int | str | None = None,
    max_batch_size: int | str = 128,
    query_max_len: int | str = _TRAIN.query_max_len,
    passage_max_len: int | str = _TRAIN.passage_max_len,
    precision: str = "auto",
    time_limit: float | str = 150.0,
    write_config: PathLike | None = None,
    work_dir: PathLike | None = None,
    show_progress: bool = True,
) -> PlanResult:
    """Measure real training steps and recommend batch x group, cache chunk and precision.

    Args:
        model: Hugging Face model name or local folder, as ``embtune train --model``.
        train_data: the training data (FlagEmbedding jsonl files or folders, BEIR folders).
        memory_budget: bytes or a size such as ``"20GiB"``; default: the device's free memory
            less ``headroom``.
        headroom: fraction of the free memory left unused when no budget is given (0.1).
        device: ``"cpu"`` or ``"cuda"`` (default: the GPU when there is one).
        train_group_size: 1 positive + negatives per query, kept as given.
        batch_size: the batch you want; it is kept and made to fit with the cached loss when it
            does not fit plain. Default: the largest that fits, up to ``max_batch_size``.
        max_batch_size: the largest batch recommended when ``batch_size`` is not given (128).
        query_max_len, passage_max_len: as ``embtune train``.
        precision: ``"auto"`` (bf16 where the device computes it natively and it measures
            faster, else fp32), ``"fp32"`` or ``"bf16"``.
        time_limit: seconds the grid may take (150); beyond, the line is extrapolated.
        write_config: write the recommended options as a YAML for ``embtune train --config``.
        work_dir: where the measuring runs write (default: a temporary folder, removed).
        show_progress: print each point as it is measured.
    """
    from embtune.hardware_plan.planner import Planner

    settings = dict(
        model=os.fspath(model),
        train_data=path_list(train_data),
        group_size=int_option(train_group_size, "--train-group-size", 1),
        batch_size=None if batch_size is None else int_option(batch_size, "--batch-size", 1),
        max_batch=int_option(max_batch_size, "--max-batch-size", 1),
        lengths=(
            int_option(query_max_len, "--query-max-len", 1),
            int_option(passage_max_len, "--passage-max-len", 1),
        ),
        precision=choice(precision, "--precision", PRECISIONS),
        time_limit=optional_float(time_limit, "--time-limit"),
        headroom=optional_float(headroom, "--headroom"),
        device=_check_device(device),
        show=show_progress,
    )
    if not 0 <= settings["headroom"] < 1:
        raise UsageError(f"--headroom: a fraction in [0, 1), got {headroom!r}")
    if settings["time_limit"] <= 0:
        raise UsageError(f"--time-limit: must be more than 0 seconds, got {time_limit!r}")
    config_file = output_file(write_config, "--write-config") if write_config else None
    planner = Planner(**settings, memory_budget=memory_budget)
    if memory_budget is not None:
        parse_size(memory_budget)  # a bad size is refused before anything is measured
    with tempfile.TemporaryDirectory(prefix="embtune-plan-") as tmp:
        result = planner.run(Path(work_dir) if work_dir else Path(tmp))
    result.device_name = device_name(settings["device"])
    result.text += f"\nmeasured on: {result.device_name}"
    if config_file is not None:
        planner.write_config(config_file, result)
        result.text += f"\nwrote the recommended options to {write_config}"
    return result


__all__ = ["GIB", "PlanResult", "plan"]
