"""Distillation, teacher-checked negatives and Matryoshka on the demo recipe (SciFact, CPU).

Every run is the demo's recipe (`embtune.demo.DemoRecipe`: one epoch, batch 16, group 4,
temperature 0.05, lr 2e-4, best checkpoint chosen on the dev split held out of train) through
the real command line, so each printed command can be run by hand. Test is evaluated, never
used to choose anything. Stages, each resumable (a stage whose output exists is skipped):

    python bench/distillation.py prepare            # dev split, mined train rows, dev pool
    python bench/distillation.py run plain
    python bench/distillation.py score              # plain model scores the train rows
    python bench/distillation.py run kd --knowledge-distillation --teacher-temperature 0.05
    python bench/distillation.py run kd-drop --knowledge-distillation \
        --teacher-temperature 0.05 --drop-teacher-false-negatives 0
    python bench/distillation.py run mrl --matryoshka-dims 384 256 128 64
    python bench/distillation.py run plain --dims   # the plain model truncated the same way
    python bench/distillation.py run drop --drop-teacher-false-negatives 0
    python bench/distillation.py report             # markdown table of every run

Runs whose options name `--knowledge-distillation` or `--drop-teacher-false-negatives` train
on the scored rows. Work folder: --work (default /tmp/embtune-distill).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from embtune.demo import DemoRecipe, _mine_and_score_base_model, _split_off_dev, find_scifact

DIMS = [384, 256, 128, 64]
SCORED = ("--knowledge-distillation", "--drop-teacher-false-negatives")


def recipe_args(recipe: DemoRecipe, train_queries: int) -> list[str]:
    """The demo's `_fine_tune` settings as `embtune train` flags."""
    steps = -(-train_queries // recipe.batch_size) * recipe.epochs
    return [
        "--train-group-size", str(recipe.train_group_size),
        "--batch-size", str(recipe.batch_size),
        "--epochs", str(recipe.epochs),
        "--temperature", str(recipe.temperature),
        "--learning-rate", str(recipe.learning_rate),
        "--warmup-ratio", str(recipe.warmup_ratio),
        "--query-max-len", str(recipe.query_max_len),
        "--passage-max-len", str(recipe.passage_max_len),
        "--seed", str(recipe.seed),
        "--logging-steps", str(max(1, steps // 25)),
        "--eval-steps", str(max(1, -(-steps // (recipe.dev_evals + 1)))),
        "--save-steps", "0",
        "--save-best",
    ]  # fmt: skip


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: dict, split: str) -> None:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) of in-memory data."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, text in corpus.items():
            f.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid in qrels:
            f.write(json.dumps({"_id": qid, "text": queries[qid]}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            f.writelines(f"{qid}\t{did}\t{grade}\n" for did, grade in judged.items())


def prepare(work: Path, data: Path, model: str) -> None:
    """The demo's first stages: dev split, mined train rows, the dev pool as a BEIR folder."""
    from embtune.data.formats import load_beir

    if (work / "prepared.json").exists():
        print(f"prepare: {work} already prepared")
        return
    work.mkdir(parents=True, exist_ok=True)
    recipe = DemoRecipe()
    train_set, test_set = load_beir(data, "train"), load_beir(data, "test")
    train_rows, dev_rows = _split_off_dev(train_set, data, recipe, work)
    stages: dict[str, float] = {}
    base = _mine_and_score_base_model(
        model, train_set, test_set, train_rows, dev_rows, recipe, work, True, stages, print
    )
    write_beir(work / "dev", base.dev.corpus, base.dev.queries, base.dev.qrels, "dev")
    record = {
        "model": model,
        "data": str(data),
        "recipe": asdict(recipe),
        "train_queries": len(train_rows),
        "before_test": base.before,
        "before_dev": base.dev_before,
        "stages": stages,
    }
    (work / "prepared.json").write_text(json.dumps(record, indent=2) + "\n")


def command(argv: list[str]) -> None:
    """Run one embtune command, printing it first; stop on failure."""
    line = " ".join(shlex.quote(a) for a in ["embtune", *argv])
    print(f"$ {line}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embtune", *argv])
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {line}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def run(work: Path, name: str, extra: list[str], dims: bool) -> None:
    """Train one variant and evaluate its best checkpoint on test (at every dimension)."""
    prepared = json.loads((work / "prepared.json").read_text())
    out = work / name
    rows = work / ("train-scored.jsonl" if any(a in SCORED for a in extra) else "train.jsonl")
    if not (out / "train_summary.json").exists():
        recipe = DemoRecipe(
            **{**prepared["recipe"], "rank_range": tuple(prepared["recipe"]["rank_range"])}
        )
        command([
            "train", "--model", prepared["model"], "--train-data", str(rows),
            "--eval-data", str(work / "dev"), "--eval-split", "dev", "--output-dir", str(out),
            "--overwrite-output-dir", *recipe_args(recipe, prepared["train_queries"]), *extra,
        ])  # fmt: skip
    evaluate(prepared, out / "best", out / ("test-dims.json" if dims else "test.json"), dims)


def evaluate(prepared: dict, model: Path, result: Path, dims: bool) -> None:
    """SciFact test metrics of ``model`` (one block per dimension with ``dims``)."""
    if result.exists():
        return
    argv = ["eval", "--model", str(model), "--data", prepared["data"], "--split", "test"]
    command([*argv, "--json", str(result), *(["--dims", *map(str, DIMS)] if dims else [])])


def score(work: Path) -> None:
    """The plain fine-tuned model (the teacher until a reranker exists) scores train rows."""
    target = work / "train-scored.jsonl"
    if target.exists():
        return
    command([
        "score", "--teacher", str(work / "plain" / "best"), "--teacher-kind", "bi-encoder",
        "--train-data", str(work / "train.jsonl"), "-o", str(target),
        "--query-max-len", "64", "--passage-max-len", "256",
    ])  # fmt: skip


def ndcg_by_dim(result: dict) -> dict[str, float]:
    """nDCG@10 of a test.json, by dimension ("full" without --dims)."""
    if "dims" in result:
        return {str(d): block["ndcg@10"] for d, block in result["dims"].items()}
    return {"full": result["ndcg@10"]}


def report(work: Path) -> None:
    """One markdown row per run: the command's extra options and test nDCG@10."""
    prepared = json.loads((work / "prepared.json").read_text())
    print(f"base model before training: test nDCG@10 {prepared['before_test']['ndcg@10']:.4f}")
    print("| run | options | best dev step | dev nDCG@10 | test nDCG@10 |\n|---|---|---|---|---|")
    for folder in sorted(p for p in work.iterdir() if (p / "train_summary.json").exists()):
        summary = json.loads((folder / "train_summary.json").read_text())
        results = [r for r in (folder / "test-dims.json", folder / "test.json") if r.exists()]
        if not results:
            continue  # trained, not yet evaluated
        result = json.loads(results[0].read_text())
        options = json.loads((folder / "bench_options.json").read_text())
        scores = ", ".join(f"{d}: {v:.4f}" for d, v in ndcg_by_dim(result).items())
        dev = summary.get("best_dev_ndcg@10")
        print(
            f"| {folder.name} | `{' '.join(options)}` | {summary.get('best_step')} | "
            f"{dev:.4f} | {scores} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("prepare", "run", "score", "report"))
    parser.add_argument("name", nargs="?", help="run name (stage run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embtune-distill"))
    parser.add_argument("--data", default=None, help="SciFact folder (default: demo lookup)")
    parser.add_argument("--model", default=None, help="base model (default: demo default)")
    parser.add_argument("--dims", action="store_true", help="evaluate at 384/256/128/64 too")
    args, extra = parser.parse_known_args()
    if args.stage == "prepare":
        from embtune.demo import default_model

        prepare(args.work, find_scifact(args.data), args.model or default_model())
    elif args.stage == "run":
        if not args.name:
            parser.error("run needs a name")
        (args.work / args.name).mkdir(parents=True, exist_ok=True)
        run(args.work, args.name, extra, args.dims or "--matryoshka-dims" in extra)
        (args.work / args.name / "bench_options.json").write_text(json.dumps(extra))
    elif args.stage == "score":
        score(args.work)
    else:
        report(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
