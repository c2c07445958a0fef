"""Reference sets (``--reference-data``): general retrieval sets watched during training.

Fine-tuning buys in-domain quality and can cost general ability (FlagEmbedding issues #781,
#834). A reference set is a BEIR folder from outside the training domain; it is evaluated
with the base model before the first step and again at every dev evaluation, logged as
``reference/<name>/<metric>`` (TensorBoard groups the tags by set), and each evaluation prints
the change against the base model, so the forgetting is seen while it happens. Reference sets
are never trained on and never select a checkpoint; ``--interpolate-base auto`` uses them to
choose how far to mix the weights back toward the base (training/interpolation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embtune.data.formats import BeirDataset, load_beir

# The metrics each reference set logs: one for ranking quality at the top, one for the rank
# of the first hit, one for coverage. All of a kind's metrics would swamp TensorBoard.
LOGGED_METRICS = ("ndcg@10", "mrr@10", "recall@100")
HEADLINE_METRIC = "ndcg@10"
PREFIX = "reference/"


@dataclass
class ReferenceSet:
    """One reference set: its name in the log (the folder's name) and its data."""

    name: str
    data: BeirDataset


def load_reference_sets(folders: Sequence[str], split: str) -> list[ReferenceSet]:
    """Each ``--reference-data`` folder read (and validated: bad rows are refused with file,
    line and field) before anything is written. Two folders of the same name get ``-2``, ...
    so that their keys stay apart."""
    sets: list[ReferenceSet] = []
    names: set[str] = set()
    for folder in folders:
        path = Path(folder)
        data = load_beir(path, split)
        base = path.resolve().name or "reference"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        sets.append(ReferenceSet(name, data))
    return sets


def metric_key(name: str, metric: str) -> str:
    """The log key of one reference set's metric: ``reference/<name>/<metric>``."""
    return f"{PREFIX}{name}/{metric}"


def evaluate_references(
    evaluate: Callable[[Any, BeirDataset], Mapping[str, float]],
    model: Any,
    sets: Sequence[ReferenceSet],
) -> dict[str, float]:
    """``evaluate(model, data)`` (a model kind's dev metrics) on every set, as log keys."""
    record: dict[str, float] = {}
    for reference in sets:
        metrics = evaluate(model, reference.data)
        for metric in LOGGED_METRICS:
            if metric in metrics:
                record[metric_key(reference.name, metric)] = metrics[metric]
    return record


def headline_scores(record: Mapping[str, object], sets: Sequence[ReferenceSet]) -> list[float]:
    """Each set's nDCG@10 in ``record`` (a log record), in the sets' order; missing ones left
    out."""
    keys = (metric_key(s.name, HEADLINE_METRIC) for s in sets)
    return [float(record[k]) for k in keys if isinstance(record.get(k), int | float)]


def mean_headline(record: Mapping[str, object], sets: Sequence[ReferenceSet]) -> float | None:
    """The mean nDCG@10 over the reference sets in ``record``; None when one is missing."""
    scores = headline_scores(record, sets)
    return sum(scores) / len(scores) if sets and len(scores) == len(sets) else None


def change_line(
    record: Mapping[str, object],
    base: Mapping[str, object] | None,
    sets: Sequence[ReferenceSet],
) -> str:
    """ "reference debian-packages nDCG@10 0.8412 (-0.0158 against the base)", one per set."""
    parts = []
    for reference in sets:
        key = metric_key(reference.name, HEADLINE_METRIC)
        if key not in record:
            continue
        value = float(record[key])  # type: ignore[arg-type]
        part = f"{reference.name} nDCG@10 {value:.4f}"
        if base is not None and key in base:
            part += f" ({value - float(base[key]):+.4f} against the base)"  # type: ignore[arg-type]
        parts.append(part)
    return "reference " + "; ".join(parts) if parts else ""


def base_record(history: Sequence[Mapping[str, object]]) -> Mapping[str, object] | None:
    """The step-0 evaluation record (the base model's), if the run has one."""
    return next(
        (h for h in history if h.get("step") == 0 and any(k.startswith(PREFIX) for k in h)),
        None,
    )


def reference_summary(
    history: Sequence[Mapping[str, object]], sets: Sequence[ReferenceSet]
) -> dict[str, dict[str, float]]:
    """{set name: {"base": nDCG@10, "end": nDCG@10 at the last evaluation}} for the summary."""
    base = base_record(history) or {}
    last = next((h for h in reversed(history) if any(k.startswith(PREFIX) for k in h)), {})
    summary: dict[str, dict[str, float]] = {}
    for reference in sets:
        key = metric_key(reference.name, HEADLINE_METRIC)
        entry = {when: float(r[key]) for when, r in (("base", base), ("end", last)) if key in r}
        summary[reference.name] = entry  # type: ignore[assignment]
    return summary
