"""Human-readable results: metric comparison tables, training-curve and Matryoshka plots."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from embtune.sweep.reports import format_or_na

HEADLINE = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")


def comparison_table(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """A markdown table of metrics before and after fine-tuning, with the change."""
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in HEADLINE:
        if key in before and key in after:
            delta = after[key] - before[key]
            lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} | {delta:+.4f} |")
    return "\n".join(lines)


def plot_curves(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """Loss (and its chance level), dev nDCG@10 and each reference set's nDCG@10 against the
    step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    chance = [(h["step"], h["chance_loss"]) for h in history if "chance_loss" in h]
    dev = [(h["step"], h["dev_ndcg@10"]) for h in history if "dev_ndcg@10" in h]
    fig, ax_loss = plt.subplots(figsize=(7, 4), dpi=120)
    if loss:
        ax_loss.plot(*zip(*loss, strict=True), color="tab:blue", label="training loss")
    if chance:
        ax_loss.plot(*zip(*chance, strict=True), color="tab:blue", ls=":", label="chance level")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss", color="tab:blue")
    ax_dev = ax_loss.twinx()
    if dev:
        ax_dev.plot(*zip(*dev, strict=True), "o-", color="tab:red", label="dev nDCG@10")
    # Colours apart from the loss's blue and dev's red, so no line reads as another's.
    colours = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive")
    curves = reference_curves(history).items()
    for (name, points), colour in zip(curves, itertools.cycle(colours), strict=False):
        ax_dev.plot(
            *zip(*points, strict=True), "s--", color=colour, label=f"reference {name} nDCG@10"
        )
    ax_dev.set_ylabel("nDCG@10 (dev, reference)", color="tab:red")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dev.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, loc="center right")
    title = "training loss and dev retrieval quality"
    ax_loss.set_title(
        title.replace("dev", "dev and reference") if reference_curves(history) else title
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reference_curves(history: Sequence[Mapping[str, float]]) -> dict[str, list[tuple]]:
    """{reference set name: [(step, nDCG@10), ...]} from the log's ``reference/<name>/ndcg@10``
    keys (training/reference_sets.py)."""
    curves: dict[str, list[tuple]] = {}
    for record in history:
        for key, value in record.items():
            if key.startswith("reference/") and key.endswith("/ndcg@10"):
                name = key.removeprefix("reference/").removesuffix("/ndcg@10")
                curves.setdefault(name, []).append((record["step"], value))
    return curves


def plot_interpolation(scores: Sequence, chosen: float, path: Path) -> None:
    """Dev and reference nDCG@10 against the interpolation factor (training/interpolation.py's
    FactorScores), the chosen factor marked; one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    dev = [(s.factor, s.dev) for s in scores if s.dev is not None]
    if dev:
        ax.plot(*zip(*dev, strict=True), "o-", color="tab:red", label="dev nDCG@10")
    names = list(scores[0].reference) if scores else []
    for name in names:
        points = [(s.factor, s.reference[name]) for s in scores]
        ax.plot(*zip(*points, strict=True), "s--", label=f"reference {name} nDCG@10")
    ax.axvline(chosen, color="gray", ls=":", label=f"chosen factor {chosen:g}")
    ax.set_xlabel("factor: base + factor x (fine-tuned - base)")
    ax.set_ylabel("nDCG@10")
    ax.legend(loc="best")
    ax.set_title("interpolation with the base model")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dimension_points(record: Mapping[str, float]) -> list[tuple[int, float]]:
    """(dimension, nDCG@10) of a dev record's Matryoshka metrics (``dev_ndcg@10_dim<d>``),
    smallest dimension first."""
    points = []
    for key, value in record.items():
        dim = key.removeprefix("dev_ndcg@10_dim")
        if dim != key and dim.isdigit():
            points.append((int(dim), value))
    return sorted(points)


def plot_dimensions(history: Sequence[Mapping[str, float]], path: Path) -> bool:
    """Dev nDCG@10 against the Matryoshka dimension, one PNG: the first and the last dev
    evaluation that has per-dimension metrics. False (nothing written) when none has them."""
    evaluations = [(h["step"], points) for h in history if (points := dimension_points(h))]
    if not evaluations:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    # The first evaluation (grey) against the last (red): what training did for each size.
    shown = [evaluations[0], evaluations[-1]] if len(evaluations) > 1 else evaluations
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for (step, points), color in zip(shown, ("tab:gray", "tab:red"), strict=False):
        ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"step {step}")
    dims = [dim for dim, _ in evaluations[-1][1]]
    ax.set_xscale("log", base=2)  # Matryoshka sizes halve: equal steps on a log axis
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel("dev nDCG@10")
    ax.legend(loc="best")
    ax.set_title("dev retrieval quality at each Matryoshka dimension")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def trade_off_table(models: Mapping[str, Mapping]) -> str:
    """The demo's models as rows: dev, test and each reference set's nDCG@10."""
    names = sorted({n for m in models.values() for n in m["reference"]})
    header = "| model | dev nDCG@10 | test nDCG@10 | " + "".join(f"{n} nDCG@10 | " for n in names)
    lines = [header.rstrip(), "|---" * (3 + len(names)) + "|"]
    for model in models.values():
        dev = f"{model['dev']:.4f}" if model["dev"] is not None else "n/a"
        cells = "".join(
            f"{model['reference'][n]:.4f} | " if n in model["reference"] else "n/a | "
            for n in names
        )
        lines.append(f"| {model['label']} | {dev} | {model['test']:.4f} | {cells}".rstrip())
    return "\n".join(lines)


def _stage_rows(stages: Mapping[str, float]) -> str:
    """The demo's time table rows, the optional stages only when they ran."""
    rows = [
        ("mining (base model encodes the corpus once; reused for \"before\")", "mine_seconds"),
        ("evaluation before", "eval_before_seconds"),
        (f"training ({stages['train_texts_per_second']:.1f} texts/s), with the evaluations "
         "below", "train_seconds"),
        ("  of which dev evaluations (base model and during training)", "dev_eval_seconds"),
        ("  of which reference-set evaluations", "reference_eval_seconds"),
        ("  of which interpolation (scoring the factors, saving the model)",
         "interpolation_seconds"),
        ("evaluation after (fine-tuned model, whole corpus)", "eval_after_seconds"),
        ("evaluation after (interpolated model, whole corpus)", "eval_interpolated_seconds"),
    ]  # fmt: skip
    return "\n".join(
        f"| {label} | {stages[key]:.0f} |" for label, key in rows if stages.get(key) is not None
    )


def _interpolation_section(payload: Mapping) -> str:
    interpolation = payload.get("interpolation")
    if not interpolation:
        return ""
    rows = ["| factor | dev nDCG@10 | mean reference nDCG@10 | scores |", "|---|---|---|---|"]
    for s in interpolation["scores"]:
        mark = "**" if s["factor"] == interpolation["factor"] else ""
        cells = [f"{mark}{s['factor']:g}{mark}", format_or_na(s["dev"], ".4f"),
                 format_or_na(s["mean_reference"], ".4f"), s["source"]]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    return f"""
## Interpolation with the base model

Model = base + factor x (fine-tuned - base). Chosen factor **{interpolation["factor"]:g}**:
{interpolation["reason"]}. Rule: {interpolation["rule"]}. Test was not looked at.

{table}

![dev and reference nDCG@10 against the factor](model/interpolation.png)
"""


def _learning_rate_section(payload: Mapping) -> str:
    search = payload.get("learning_rate_search")
    if not search:
        return ""
    rows = [
        "| learning rate | dev nDCG@10 | mean reference nDCG@10 | seconds |",
        "|---|---|---|---|",
    ]
    for t in search["trials"]:
        mark = "**" if t["learning_rate"] == search["chosen"] else ""
        cells = [
            f"{mark}{t['learning_rate']:g}{mark}",
            format_or_na(t["dev_ndcg10"], ".4f"),
            format_or_na(t["reference_mean"], ".4f"),
            format_or_na(t["seconds"], ".0f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    return f"""
## The learning rate, chosen on dev

Short trials of {search["trial_steps"]} steps each; chosen **{search["chosen"]:g}**:
{search["reason"]}.

{table}
"""


def write_demo_report(out: Path, payload: Mapping, history: Sequence[Mapping[str, float]]) -> None:
    """report.md and curves.png for a demo run."""
    plot_curves(history, out / "curves.png")
    recipe = payload["recipe"]
    settings = "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
    reference = payload.get("reference_data")
    watched = (
        f"Reference set (general retrieval, never trained on): `{reference}`."
        if reference
        else "No reference set was given: forgetting was not measured."
    )
    text = f"""# embtune demo report

Base model `{payload["model"]}`, data {payload["dataset"]} (`{payload["data"]}`){
        f" (limited to {payload['limit']} queries per split)" if payload.get("limit") else ""
    }.
Fine-tuned on {payload["train_queries"]} train queries with mined hard negatives; checkpoint
chosen on {payload["dev_queries"]} held-out train queries (dev, step {payload["best_dev_step"]});
evaluated on {payload["test_queries"]} test queries over the whole corpus ({payload["corpus"]}
documents). {watched}

## Retrieval on the {payload["dataset"]} test split: the base model and the demo's model

{comparison_table(payload["before"], payload["after"])}

## In-domain against general: what fine-tuning costs, and what interpolation takes back

{trade_off_table(payload["models"])}
{_learning_rate_section(payload)}{_interpolation_section(payload)}
## Time

| stage | seconds |
|---|---|
{_stage_rows(payload["stages"])}
| **total wall time** | **{payload["wall_seconds"]:.0f}** |

## Curves

![loss, dev and reference nDCG@10](curves.png)

Dev nDCG@10 searches the dev queries' positives plus the base model's top
{recipe["dev_pool"]} documents per dev query ({payload["dev_corpus"]} documents), not the whole
corpus: cheap enough to run during training, and it tracks what fine-tuning changes. A
reference set is searched whole.

## Recipe

| setting | value |
|---|---|
{settings}
"""
    (out / "report.md").write_text(text, encoding="utf-8")
