"""embtune.api.train: fine-tune a model, as `embtune train`, with its options checked."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from typing import TYPE_CHECKING

from embtune.api.options import PathLike, path_list
from embtune.config import TrainConfig, flag, resolve_config, type_hints
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    from embtune.data.formats import BeirDataset
    from embtune.objectives.base import Objective
    from embtune.training.run import TrainResult


def _train_options(options: dict[str, object]) -> dict[str, object]:
    """Keyword options as TrainConfig values: names checked, paths made strings, types checked.

    On the command line argparse does the type check; without it a wrong type would surface as
    a TypeError deep inside validation.
    """
    hints = type_hints()
    out: dict[str, object] = {}
    for name, value in options.items():
        if name not in hints:
            close = difflib.get_close_matches(name, hints, n=1)
            advice = f"; did you mean {close[0]!r}?" if close else " (see `embtune train --help`)"
            raise UsageError(f"unknown option {name!r}{advice}")
        if name == "train_data" and value is not None:
            value = path_list(value)  # type: ignore[arg-type]
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        hint = hints[name]
        optional = type(None) in typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | None, float | str
            kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        else:
            kinds = [typing.get_origin(hint) or hint]  # list[str] -> list
        kind = next((k for k in kinds if _is_a(value, k)), None)
        if kind is None and not (value is None and optional):
            expected = " or ".join(k.__name__ for k in kinds)
            raise UsageError(f"{flag(name)}: expected {expected}, got {value!r}")
        out[name] = float(value) if kind is float else value  # type: ignore[arg-type]
    return out


def _is_a(value: object, kind: type) -> bool:
    """True when ``value`` may stand for an option of type ``kind`` (an int for a float)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def train(
    config: TrainConfig | PathLike | None = None,
    *,
    show_progress: bool = True,
    dev_data: BeirDataset | None = None,
    objective: Objective | None = None,
    kind_name: str | None = None,
    **options: object,
) -> TrainResult:
    """Fine-tune an embedding model, as `embtune train` does; the model is saved to output_dir.

    Args:
        config: a :class:`~embtune.config.TrainConfig`, or the path of a YAML file of options
            (as ``--config``), or None for the defaults.
        show_progress: show the progress bar of the steps.
        dev_data: a dev set (a :class:`~embtune.data.formats.BeirDataset`) evaluated during
            training; replaces ``eval_data`` / ``dev_fraction``.
        objective: the objective to train (an :class:`~embtune.objectives.base.Objective`, e.g.
            ``WeightedSum([(1.0, InfoNCE(0.02)), (0.5, mine)])``); default: the model kind's
            (InfoNCE for a bi-encoder). docs/architecture.md, "Adding an objective".
        kind_name: a name registered in ``embtune.kinds.MODEL_KINDS``; default: the
            ``model_kind`` option (``"bi-encoder"``, or ``"cross-encoder"`` for a reranker).
        **options: any :class:`~embtune.config.TrainConfig` field (the command's option without
            ``--``, dashes as underscores: ``train_group_size=4``); they override ``config``.
            ``model``, ``train_data`` and ``output_dir`` are required (here or in ``config``).

    Returns:
        The :class:`~embtune.training.run.TrainResult`: ``output_dir``, ``steps``, ``history``
        (the logged records), ``budget``, ``best_step`` / ``best_ndcg`` with a dev set,
        ``reference`` (each ``reference_data`` set's nDCG@10 for the base and at the last
        evaluation), ``interpolation`` (with ``interpolate_base``: the factor, why, the
        scores of every factor and the folder of the mixed model), ...

    Raises:
        UsageError: an unknown or bad option or input, with the command's one-line message.

    Example:
        ::

            from embtune import api

            result = api.train(model="BAAI/bge-small-en-v1.5", train_data=["train.jsonl"],
                               output_dir="out", train_group_size=4, max_steps=100)
            print(result.steps, result.history[-1]["loss"])
    """
    given = _train_options(options)
    if isinstance(config, TrainConfig):
        config = dataclasses.replace(config, **given)  # type: ignore[arg-type]
        config.validate()
    else:
        # Defaults < YAML file < options, validated: the same merge as the command line.
        if config is not None:
            given["config"] = os.fspath(config)
        config = resolve_config(argparse.Namespace(**given))

    from embtune.kinds import MODEL_KINDS
    from embtune.training.run import train as run_training

    kind_name = kind_name or config.model_kind
    if kind_name not in MODEL_KINDS:
        raise UsageError(f"unknown model kind {kind_name!r}; known: {', '.join(MODEL_KINDS)}")
    return run_training(
        config,
        show_progress=show_progress,
        dev_data=dev_data,
        objective=objective,
        kind_name=kind_name,
    )
