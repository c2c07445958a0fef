"""Model merging: weighted averages of the weights of models of one architecture.

Fine-tuning a retriever costs some of its general ability; mixing its weights back toward the
base model's, ``base + a x (fine-tuned - base)`` (WiSE-FT, Wortsman et al. 2022), recovers most
of it at little cost in the target domain, and averaging several fine-tuned models
(LM-Cocktail, Xiao et al. 2023) combines what each learned. docs/merge.md has the details.

The core works on state dicts in memory (:func:`mix_state_dicts`,
:func:`interpolate_state_dicts`), so training can interpolate the model it just trained; the
folder functions below it read models from disk and write the merged one, for `embtune merge`.

Example::

    mixed = interpolate_state_dicts(base.state_dict(), tuned.state_dict(), alpha=0.7)
    tuned.load_state_dict(mixed)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from embtune.errors import TrainingStopped, UsageError

WEIGHTS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
RECORD_FILE = "merge.json"  # what was merged, with which weights and by which rule

# Files holding weights, in any format: none is copied into a merged folder, where they would
# be the unmerged model's (an onnx/ export, a pytorch_model.bin beside model.safetensors, ...).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot")
_WEIGHT_SUFFIXES += (".gguf", ".ckpt", ".tflite")
# What a hub download leaves out: exports of the weights that merging neither reads nor copies.
_EXPORT_PATTERNS = ["onnx/*", "openvino/*", "coreml/*", "*.h5", "*.msgpack", "*.ot", "*.gguf"]
_EXPORT_PATTERNS += ["*.tflite", "*.ckpt"]


class MergeMismatch(UsageError):
    """The models cannot be merged: their architectures, tensor names, shapes or dtypes differ.

    The message names the first difference found, and the models by the names given.
    """


# --- mixing state dicts ----------------------------------------------------------------------


def mix_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * states[i]``, tensor by tensor; ``names`` label the models in errors.

    Every model must have the same tensor names with the same shapes and dtypes; they are
    compared in the first model's order and the first difference raises :class:`MergeMismatch`
    (before any arithmetic), then names only a later model has. Floating tensors are summed in
    float64 (float32 on Apple's MPS, which has no float64) and cast back to their dtype;
    non-floating ones (integer buffers such as ``position_ids``) must be equal in every model
    and are copied. With one weight 1 and the others 0 the result is that model's tensors,
    copied bit for bit. Results are new tensors on the first model's device.

    ``weights`` must be finite, >= 0 and sum to 1 (within 1e-6; callers normalise), one per
    model, else ValueError.
    """
    _check_weights(states, weights, names)
    weights = [float(w) for w in weights]  # numpy or torch scalars work as plain floats
    _check_alike(states, names)
    # Exactly one model at weight 1: copy it, as arithmetic (1 x w + 0 x v) could change bits
    # (-0.0 becomes 0.0; an inf elsewhere becomes nan).
    ones, zeros = [i for i, w in enumerate(weights) if w == 1], [w for w in weights if w == 0]
    hot = ones[0] if len(ones) == 1 and len(zeros) == len(weights) - 1 else None
    mixed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, first in states[0].items():
            if hot is not None or not first.is_floating_point():
                mixed[key] = states[hot or 0][key].detach().clone()
                continue
            mixed[key] = _weighted_sum([state[key] for state in states], weights, first)
    return mixed


def interpolate_state_dicts(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) x base + alpha x tuned``: at 0 the base model, at 1 the fine-tuned one,
    both exactly (:func:`mix_state_dicts`, names "base" and "fine-tuned").

    ``alpha`` must be a number in [0, 1], else ValueError; a model mismatch raises
    :class:`MergeMismatch`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    return mix_state_dicts((base, tuned), (1.0 - alpha, alpha), ("base", "fine-tuned"))


def _check_weights(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str]
) -> None:
    """One finite weight >= 0 and one name per model, the weights summing to 1."""
    if not states:
        raise ValueError("mix_state_dicts needs at least one model")
    if not len(states) == len(weights) == len(names):
        raise ValueError(
            f"{len(states)} models, {len(weights)} weights and {len(names)} names: "
            "give one weight and one name per model"
        )
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) for w in weights):
        raise ValueError(f"weights must be numbers, got {list(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if abs(math.fsum(weights) - 1) > 1e-6:
        raise ValueError(f"weights must sum to 1 (normalise them first), got {list(weights)}")


def _check_alike(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """MergeMismatch naming the first tensor the models do not share alike."""
    first, first_name = states[0], names[0]
    for key, tensor in first.items():
        for state, name in zip(states[1:], names[1:], strict=True):
            if key not in state:
                raise MergeMismatch(
                    f"model {name} has no tensor {key!r} that model {first_name} has"
                )
            other = state[key]
            if other.shape != tensor.shape:
                raise MergeMismatch(
                    f"tensor {key!r}: shape {list(tensor.shape)} in {first_name}, "
                    f"{list(other.shape)} in {name}"
                )
            if other.dtype != tensor.dtype:
                raise MergeMismatch(
                    f"tensor {key!r}: dtype {_dtype(tensor)} in {first_name}, "
                    f"{_dtype(other)} in {name}"
                )
            if not tensor.is_floating_point() and not torch.equal(tensor, other.to(tensor.device)):
                raise MergeMismatch(
                    f"tensor {key!r} ({_dtype(tensor)}): values differ between {first_name} and "
                    f"{name}; tensors that are not floating point are copied, so they must be "
                    "equal"
                )
    for state, name in zip(states[1:], names[1:], strict=True):
        extra = next((key for key in state if key not in first), None)
        if extra is not None:
            raise MergeMismatch(f"model {first_name} has no tensor {extra!r} that model {name} has")


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], like: torch.Tensor
) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]`` accumulated in float64, as ``like``'s dtype and device.

    float64 keeps the sum from rounding before the one cast at the end (fp16 or bf16 inputs
    would otherwise lose bits at every model added); a model at weight 0 is skipped, so its
    values cannot reach the result (0 x inf is nan).
    """
    wide = torch.float32 if like.device.type == "mps" else torch.float64
    total: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights, strict=True):
        if weight == 0:
            continue
        term = tensor.detach().to(device=like.device, dtype=wide)
        # torch.mul makes a new tensor: `term` may be the caller's own float64 tensor.
        total = torch.mul(term, weight) if total is None else total.add_(term, alpha=weight)
    assert total is not None  # the weights sum to 1, so one is not 0
    return total.to(like.dtype)


# --- models on disk --------------------------------------------------------------------------


@dataclass
class MergeSummary:
    """What :func:`merge_folders` wrote."""

    output: Path
    folders: list[Path]  # the models' folders, resolved (hub names: their downloaded snapshots)
    tensors: int  # tensors written
    mixed: int  # of those, floating tensors mixed
    copied: int  # non-floating tensors copied (equal in every model)


def resolve_model(name_or_path: str | os.PathLike[str], option: str = "--model") -> Path:
    """The folder of a model: a local folder, else a Hugging Face hub name, downloaded (or
    found in the cache when offline); a UsageError naming ``option`` when neither works."""
    name = os.fspath(name_or_path)
    local = Path(name)
    if local.is_dir():
        return local
    if local.exists():
        raise UsageError(f"{option}: {name} is a file, not a model folder")
    # A hub name is "name" or "owner/name": anything else can only have been meant as a path.
    if not name or local.is_absolute() or name.startswith(".") or name.count("/") > 1:
        raise UsageError(f"{option}: folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, ignore_patterns=_EXPORT_PATTERNS))
    except Exception as exc:  # offline, no such repository, a bad name: all the user's to fix
        raise UsageError(
            f"{option}: {name} is not a folder here and cannot be had from the Hugging Face "
            f"hub: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config(folder: Path, option: str = "--model") -> dict:
    """The model's ``config.json`` as a dict; a UsageError naming the file when it is missing
    or is not a JSON object."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{option}: {folder} has no {CONFIG_FILE} (not a Hugging Face model)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{option}: {path} is not readable JSON: {_first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise UsageError(f"{option}: {path} must hold a JSON object, not {type(config).__name__}")
    return config


def check_same_architecture(configs: Sequence[Mapping], names: Sequence[str]) -> None:
    """MergeMismatch when the configs' ``model_type`` or ``architectures`` differ, naming both
    values and the models (compared with the first)."""
    for key in ("model_type", "architectures"):
        first = configs[0].get(key)
        for config, name in zip(configs[1:], names[1:], strict=True):
            if config.get(key) != first:
                raise MergeMismatch(
                    f"{CONFIG_FILE}: {key} {first!r} in {names[0]}, {config.get(key)!r} in {name}"
                )


def read_weights(folder: Path, option: str = "--model") -> dict[str, torch.Tensor]:
    """All tensors of a model folder, on the CPU: ``model.safetensors``, else the shards of
    ``model.safetensors.index.json``, else ``pytorch_model.bin`` (or its shards), read with
    ``weights_only=True`` (no code in the file runs). A UsageError naming the file when there
    is none or it cannot be read."""
    if (folder / WEIGHTS_FILE).is_file():
        return _read_safetensors(folder / WEIGHTS_FILE, option)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _read_shards(folder / SAFETENSORS_INDEX, option)
    if (folder / BIN_FILE).is_file():
        return _read_bin(folder / BIN_FILE, option)
    if (folder / BIN_INDEX).is_file():
        return _read_shards(folder / BIN_INDEX, option)
    raise UsageError(
        f"{option}: {folder} has no weights ({WEIGHTS_FILE}, {SAFETENSORS_INDEX} or {BIN_FILE})"
    )


def _read_safetensors(path: Path, option: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{option}: cannot read {path}: {_first_line(exc)}") from exc


def _read_bin(path: Path, option: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UsageError(f"{option}: cannot read {path}: {_first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UsageError(f"{option}: {path} is not a state dict (names to tensors)")
    return state


def _read_shards(index: Path, option: str) -> dict[str, torch.Tensor]:
    """The tensors of every shard an index's ``weight_map`` names, checked to be there."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{option}: {index} is not a shard index: {_first_line(exc)}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UsageError(f"{option}: {index}: weight_map must map tensor names to file names")
    read = _read_safetensors if index.name.endswith(".safetensors.index.json") else _read_bin
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):  # each file once, in order
        if not (index.parent / shard).is_file():
            raise UsageError(f"{option}: {index} names shard {shard}, which is missing")
        tensors.update(read(index.parent / shard, option))
    missing = next((key for key in weight_map if key not in tensors), None)
    if missing is not None:
        raise UsageError(
            f"{option}: {index} puts tensor {missing!r} in {weight_map[missing]}, which lacks it"
        )
    return tensors


def merge_folders(
    models: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    files_from: int = 0,
    record: Mapping[str, object] | None = None,
) -> MergeSummary:
    """Mix the weights of model folders (or hub names) and write the result to ``output``.

    ``weights`` as :func:`mix_state_dicts` takes them (summing to 1). ``names`` label the models
    in errors (default: as given); ``options`` are the command-line options that gave them, for
    messages about unusable folders (default ``--model``). The checks come first and in this
    order: folders, ``output`` not one of them (nor above one), configs and architectures,
    weights, tensors. ``output`` receives the files of ``models[files_from]`` (see
    :func:`write_merged_folder`) with the merged weights and ``merge.json``: the inputs, their
    weights and ``record``. The caller checks that ``output`` may be replaced.
    """
    given = [os.fspath(m) for m in models]
    names = list(names) if names is not None else given
    options = list(options) if options is not None else ["--model"] * len(given)
    folders = [resolve_model(m, o) for m, o in zip(given, options, strict=True)]
    output = Path(output)
    _refuse_input_as_output(output, folders, options)
    configs = [read_config(f, o) for f, o in zip(folders, options, strict=True)]
    check_same_architecture(configs, names)
    _check_module_folders(folders[files_from], options[files_from])
    states = [read_weights(f, o) for f, o in zip(folders, options, strict=True)]
    mixed = mix_state_dicts(states, weights, names)
    del states  # the inputs can be freed before writing
    floating = sum(t.is_floating_point() for t in mixed.values())
    summary = MergeSummary(output, folders, len(mixed), floating, len(mixed) - floating)
    from embtune import __version__

    merge_record = {
        **(record or {}),
        "models": [
            {"model": m, "folder": str(f.absolute()), "weight": w}
            for m, f, w in zip(given, folders, weights, strict=True)
        ],
        "files_from": given[files_from],
        "tensors": {"mixed": summary.mixed, "copied": summary.copied},
        "embtune_version": __version__,
    }
    write_merged_folder(output, mixed, folders[files_from], merge_record)
    return summary


def _refuse_input_as_output(output: Path, folders: Sequence[Path], options: Sequence[str]) -> None:
    """Replacing ``output`` would delete an input that is it or lies inside it."""
    out = output.resolve()
    for folder, option in zip(folders, options, strict=True):
        if folder.resolve() == out or out in folder.resolve().parents:
            raise UsageError(
                f"--output: {output} is or holds the {option} model {folder}; write the merged "
                "model to another folder"
            )


def _module_folders(folder: Path) -> set[str]:
    """The sentence-transformers module folders that ``modules.json`` lists (``1_Pooling``)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(modules, list):
        return set()
    paths = (m.get("path") for m in modules if isinstance(m, dict))
    return {p.split("/")[0] for p in paths if isinstance(p, str) and p}


def _check_module_folders(folder: Path, option: str) -> None:
    """Refuse a model whose sentence-transformers modules have weights of their own (a Dense
    layer): only the transformer's weights are mixed, so the merged model would be wrong."""
    for name in sorted(_module_folders(folder)):
        weighted = [p for p in (folder / name).rglob("*") if _is_weight_file(p.name)]
        if weighted:
            raise UsageError(
                f"{option}: {folder}: module {name} has weights of its own "
                f"({weighted[0].name}); merge mixes only the transformer's weights"
            )


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES + (".bin.index.json", ".safetensors.index.json"))


def _run_files() -> set[str]:
    """Files of an embtune run folder that describe the run, not the model: left out."""
    from embtune import run_files

    return {
        run_files.LOG_FILE,
        run_files.CONFIG_FILE,
        run_files.BUDGET_FILE,
        run_files.SUMMARY_FILE,
        run_files.DEV_SPLIT_FILE,
        run_files.REJECTED_FILE,
        run_files.DIMENSIONS_PLOT,
        run_files.TRAINER_STATE_FILE,
    }


def model_files(folder: Path) -> list[Path]:
    """What a merged folder copies from ``folder``: its top-level files and the module folders
    ``modules.json`` lists, except weight files, hidden files, an earlier ``merge.json`` and
    the files of an embtune run (a run folder is also its model's folder: its checkpoints,
    logs and TensorBoard events belong to the run)."""
    skip = _run_files() | {RECORD_FILE}
    modules = _module_folders(folder)
    chosen = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in skip:
            continue
        if entry.is_file() and not _is_weight_file(entry.name):
            chosen.append(entry)
        elif entry.is_dir() and entry.name in modules:
            chosen.append(entry)
    return chosen


def write_merged_folder(
    output: Path, tensors: Mapping[str, torch.Tensor], source: Path, record: Mapping[str, object]
) -> None:
    """Write ``output``: :func:`model_files` of ``source``, ``tensors`` as one
    ``model.safetensors`` and ``record`` as ``merge.json``.

    All of it is written into ``.OUTPUT.tmp`` and renamed, replacing ``output`` if it exists: a
    failure or a kill leaves the old folder (or none), never half a model. A failed write (a
    full disk) raises TrainingStopped (exit 3) saying nothing was written.
    """
    from safetensors.torch import save_file

    from embtune.atomic import write_json_atomically
    from embtune.checkpoint import is_write_failure, save_atomically, write_problem

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for path in model_files(source):
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)  # follows links: hub snapshots are links
        contiguous = {key: t.contiguous() for key, t in tensors.items()}
        save_file(contiguous, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json_atomically(tmp / RECORD_FILE, record)

    try:
        save_atomically(output, write)
    except Exception as exc:
        if not is_write_failure(exc, output):
            raise
        raise TrainingStopped(
            f"could not write {output}: {write_problem(exc, output)}; the merge was done but "
            "nothing was saved: free some space (or choose another --output) and run again"
        ) from exc
