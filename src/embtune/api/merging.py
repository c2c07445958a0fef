"""embtune.api.merge: mix the weights of models of one architecture, as `embtune merge`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from embtune.api.options import PathLike, optional_float, path_list, unwritable
from embtune.errors import UsageError

INTERPOLATION = "(1 - alpha) * base + alpha * model"
WEIGHTED_AVERAGE = "sum_i weight_i * model_i, the weights normalised to sum to 1"


@dataclasses.dataclass
class MergeResult:
    """What `embtune merge` reports: the models and their weights, the tensors, the output."""

    output: Path  # the merged model's folder
    models: list[tuple[str, str, float]]  # (role, model as given, weight it got)
    formula: str
    tensors: int  # tensors written
    mixed: int  # floating tensors mixed
    copied: int  # non-floating tensors copied (equal in every model)
    seconds: float
    alpha: float | None = None  # the interpolation factor (--base), else None

    @property
    def text(self) -> str:
        """The report as a small aligned table (what the command prints)."""
        return format_merge_report(self)


def format_merge_report(result: MergeResult) -> str:
    """The merge report: one line per model with its weight, the rule, tensors, output."""
    rule = result.formula + (f", alpha = {result.alpha:.6g}" if result.alpha is not None else "")
    # Integer buffers (position ids) are copied, not mixed: worth a word only when there are any.
    copied = f", {result.copied:,} copied (not floating point, equal in every model)"
    copied = copied if result.copied else ""
    lines = [
        *((role, f"{weight:<8.6g}  {model}") for role, model, weight in result.models),
        ("rule", rule),
        ("tensors", f"{result.mixed:,} mixed{copied}"),
        ("output", str(result.output)),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def merge(
    model: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    base: PathLike | None = None,
    alpha: float | str | None = None,
    weights: Sequence[float | str] | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Mix the weights of models of one architecture and save the result, as `embtune merge`.

    With ``base``: ``(1 - alpha) x base + alpha x model`` for one ``model`` (WiSE-FT-style
    interpolation; alpha 0 is the base, 1 the model, both bit for bit). Without it:
    ``sum_i weights[i] x model[i]`` for two or more models, the weights (>= 0, not all 0)
    normalised to sum to 1 (LM-Cocktail's ``mix_models`` takes weights that already sum to 1;
    those mean the same here). Models are folders or hub names; their config.json
    ``model_type`` and ``architectures`` and every tensor's name, shape and dtype must match.
    ``output`` gets the (first) model's files but its weights, the merged weights as
    model.safetensors and merge.json (inputs, weights, rule), all written atomically; an
    existing non-empty ``output`` is replaced only with ``overwrite``, never when it is or
    holds one of the models.

    A bad option or an unusable model is a UsageError (models that do not match:
    :class:`embtune.merging.MergeMismatch`); a failed write is TrainingStopped.
    """
    started = time.perf_counter()
    models = path_list(model)
    output = Path(output)
    if base is None:
        plan = _mix_plan(models, alpha, weights)
    else:
        plan = _interpolation_plan(models, str(base), alpha, weights)
    _check_output(output, overwrite)
    from embtune.merging import merge_folders

    summary = merge_folders(
        plan.models,
        plan.weights,
        output,
        options=plan.options,
        files_from=plan.files_from,
        record=plan.record,
    )
    return MergeResult(
        output=summary.output,
        models=list(zip(plan.roles, plan.models, plan.weights, strict=True)),
        formula=plan.record["formula"],
        tensors=summary.tensors,
        mixed=summary.mixed,
        copied=summary.copied,
        seconds=time.perf_counter() - started,
        alpha=plan.record.get("alpha"),
    )


@dataclasses.dataclass
class _Plan:
    """The merge the options ask for: models in order, normalised weights, the option that gave
    each model and its role in the report, whose files the output gets, the rule for
    merge.json."""

    models: list[str]
    weights: list[float]
    options: list[str]
    roles: list[str]
    files_from: int
    record: dict


def _interpolation_plan(
    models: list[str], base: str, alpha: float | str | None, weights: Sequence[object] | None
) -> _Plan:
    """--base B --model M --alpha A: the models (B, M) at weights (1 - A, A)."""
    if len(models) != 1:
        raise UsageError(
            f"--base: interpolates one --model, got {len(models)}; to mix several models list "
            "them all (the base too) in --model with --weights"
        )
    if weights is not None:
        raise UsageError("--weights: not with --base; give --alpha, the weight of --model")
    factor = optional_float(alpha, "--alpha")
    if factor is None:
        raise UsageError("--alpha: required with --base (0 = the base, 1 = the --model)")
    if not 0 <= factor <= 1:
        raise UsageError(f"--alpha: must be in [0, 1], got {factor:g}")
    record = {"rule": "interpolation", "formula": INTERPOLATION, "alpha": factor}
    # The output is the fine-tuned model moved toward its base: it keeps the model's files.
    options = ["--base", "--model"]
    return _Plan([base, models[0]], [1.0 - factor, factor], options, ["base", "model"], 1, record)


def _mix_plan(
    models: list[str], alpha: float | str | None, weights: Sequence[float | str] | None
) -> _Plan:
    """--model M1 M2 ... --weights w1 w2 ...: the models at their weights, normalised."""
    if alpha is not None:
        raise UsageError("--alpha: needs --base (alpha is the weight of --model against it)")
    if len(models) < 2:
        raise UsageError(
            "--model: give two or more models to mix with --weights, or one with --base and --alpha"
        )
    if weights is None:
        raise UsageError(f"--weights: required to mix models: one per --model ({len(models)})")
    given = [optional_float(w, "--weights") for w in weights]
    if len(given) != len(models):
        raise UsageError(
            f"--weights: {len(given)} weights for {len(models)} models; give one per --model"
        )
    if any(w < 0 for w in given):
        raise UsageError(f"--weights: must be >= 0, got {', '.join(f'{w:g}' for w in given)}")
    total = sum(given)
    if total <= 0:
        raise UsageError("--weights: all are 0; at least one must be positive")
    record = {"rule": "weighted average", "formula": WEIGHTED_AVERAGE, "weights_given": given}
    options = ["--model"] * len(models)
    roles = [f"model {i + 1}" for i in range(len(models))]
    return _Plan(models, [w / total for w in given], options, roles, 0, record)


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, an existing non-empty folder without ``overwrite``, or
    in a folder that cannot be written (before any model is read)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output: {output} is a file; give a folder for the merged model")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(
            f"--output: {output} exists and is not empty; choose a new folder, or add "
            "--overwrite to replace it"
        )
    # The merged folder is written beside the output and renamed: that folder must be writable.
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output: {parent} is not a folder")
    if reason := unwritable(parent):
        raise UsageError(f"--output: cannot write to folder {parent}: {reason}")
