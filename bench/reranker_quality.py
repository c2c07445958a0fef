"""Reranker quality against the sentence-transformers anchor, on the pipeline's SciFact rows.

The embtune reranker of examples/distill_from_reranker.sh (or any `embtune train --model-kind
cross-encoder` run) is compared with a sentence-transformers CrossEncoder trained with the same
settings, read from the run's train_config.yaml (model, rows, epochs, batch, group size, learning
rate, warm-up, weight decay, pair length, seed; bench/anchors/st_reranker_train.py, ListNetLoss
with one-hot targets = the listwise cross-entropy). Both final models (after the same epochs, no
dev selection: the anchor has none) rerank the same retriever's top-k of SciFact test through
`embtune eval --reranker`, so the scoring is identical. Printed: test nDCG@10 / MRR@10 first stage
and reranked, and each tool's training pairs/s (whole training: the anchor's data loading and
tokenization included, embtune's steps).

    python bench/reranker_quality.py --run /tmp/embtune-pipeline/reranker \
        --retriever /tmp/embtune-pipeline/retriever/best --out bench/results/reranker-quality-cpu.md

The anchor venv comes from bench/anchors/setup.sh.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ST_PYTHON = BENCH / ".venv-st" / "bin" / "python"


def run(command: list[str]) -> None:
    """Run and echo a command; stop the benchmark when it fails."""
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def train_anchor(config: dict, out: Path) -> dict:
    """The sentence-transformers CrossEncoder with the embtune run's settings (skipped when
    its model exists)."""
    if not (out / "train_info.json").is_file():
        max_len = config["max_len"] or config["query_max_len"] + config["passage_max_len"]
        data = config["train_data"]
        run(
            [
                str(ST_PYTHON), str(BENCH / "anchors" / "st_reranker_train.py"),
                "--train", data[0], "--output", str(out), "--model", config["model"],
                "--max-length", str(max_len), "--group", str(config["train_group_size"]),
                "--batch-size", str(config["batch_size"]), "--epochs", str(config["epochs"]),
                "--learning-rate", str(config["learning_rate"]),
                "--warmup-ratio", str(config["warmup_ratio"]),
                "--weight-decay", str(config["weight_decay"]), "--seed", str(config["seed"]),
            ]
        )  # fmt: skip
    return json.loads((out / "train_info.json").read_text())


def rerank(reranker: Path, retriever: str, data: str, top_k: int, max_len: int, out: Path) -> dict:
    """`embtune eval --reranker` of ``reranker`` on the retriever's top-k (cached)."""
    if not out.is_file():
        run(
            [
                sys.executable, "-m", "embtune", "eval", "--model", retriever, "--data", data,
                "--split", "test", "--reranker", str(reranker), "--rerank-top-k", str(top_k),
                "--rerank-max-length", str(max_len), "--json", str(out),
            ]
        )  # fmt: skip
    return json.loads(out.read_text())


def main() -> int:
    """Train the anchor, rerank with both, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the embtune reranker run folder")
    parser.add_argument("--retriever", required=True, help="first stage of both rerankers")
    parser.add_argument("--data", default=str(BENCH.parent.parent / "shared/data/scifact"))
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None, help="default: RUN/../anchor")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    config = yaml.safe_load((args.run / "train_config.yaml").read_text())
    work = args.work or args.run.parent / "reranker-anchor"
    max_len = config["max_len"] or config["query_max_len"] + config["passage_max_len"]
    anchor = train_anchor(config, work)
    ours = json.loads((args.run / "train_summary.json").read_text())
    results = {
        "embtune": rerank(args.run, args.retriever, args.data, args.top_k, max_len,
                          work / "eval-embtune.json"),
        "sentence-transformers": rerank(work / "model", args.retriever, args.data, args.top_k,
                                        max_len, work / "eval-st.json"),
    }  # fmt: skip
    pairs_per_second = {
        "embtune": ours["texts_per_second"],
        "sentence-transformers": anchor["pairs_per_second"],
    }
    lines = [
        f"Rerankers trained with the same settings ({config['epochs']} epoch(s), batch "
        f"{config['batch_size']}, group {config['train_group_size']}, lr "
        f"{config['learning_rate']}, pairs of {max_len} tokens, seed {config['seed']}), final "
        f"models, reranking the top {args.top_k} of {args.retriever} on SciFact test:",
        "",
        "| reranker | nDCG@10 | MRR@10 | first stage nDCG@10 | training pairs/s |",
        "|---|---|---|---|---|",
    ]
    for name, record in results.items():
        first, reranked = record["first_stage"], record["reranked"]
        lines.append(
            f"| {name} | {reranked['ndcg@10']:.4f} | {reranked['mrr@10']:.4f} | "
            f"{first['ndcg@10']:.4f} | {pairs_per_second[name]:.2f} |"
        )
    lines += ["", "command: " + shlex.join([sys.executable, *sys.argv])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
