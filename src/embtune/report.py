"""Human-readable results: metric comparison tables, training-curve and Matryoshka plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
    """Loss (and its chance level) and dev nDCG@10 against the step, one PNG."""
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
    ax_dev.set_ylabel("dev nDCG@10", color="tab:red")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dev.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, loc="center right")
    ax_loss.set_title("training loss and dev retrieval quality")
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


def write_demo_report(out: Path, payload: Mapping, history: Sequence[Mapping[str, float]]) -> None:
    """report.md and curves.png for a demo run."""
    plot_curves(history, out / "curves.png")
    recipe = payload["recipe"]
    stages = payload["stages"]
    settings = "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
    text = f"""# embtune demo report

Base model `{payload["model"]}`, data `{payload["data"]}`{
        f" (limited to {payload['limit']} queries per split)" if payload.get("limit") else ""
    }.
Fine-tuned on {payload["train_queries"]} train queries with mined hard negatives; checkpoint
chosen on {payload["dev_queries"]} held-out train queries (dev, step {payload["best_dev_step"]});
evaluated on {payload["test_queries"]} test queries over the whole corpus ({payload["corpus"]}
documents).

## Retrieval on the test split

{comparison_table(payload["before"], payload["after"])}

## Time

| stage | seconds |
|---|---|
| mining (base model encodes the corpus once; reused for "before") | {stages["mine_seconds"]:.0f} |
| evaluation before | {stages["eval_before_seconds"]:.0f} |
| training ({stages["train_texts_per_second"]:.1f} texts/s) | {stages["train_seconds"]:.0f} |
| evaluation after | {stages["eval_after_seconds"]:.0f} |
| **total wall time** | **{payload["wall_seconds"]:.0f}** |

## Curves

![loss and dev nDCG@10](curves.png)

Dev nDCG@10 searches the dev queries' positives plus the base model's top
{recipe["dev_pool"]} documents per dev query ({payload["dev_corpus"]} documents), not the whole
corpus: cheap enough to run during training, and it tracks what fine-tuning changes.

## Recipe

| setting | value |
|---|---|
{settings}
"""
    (out / "report.md").write_text(text, encoding="utf-8")
