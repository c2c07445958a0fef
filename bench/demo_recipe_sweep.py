"""Run the demo with several recipes and print test and dev nDCG@10 side by side.

Used to choose the demo's recipe (docs/demo-recipe.md). The choice is made on the *dev*
numbers (held-out train queries); test is printed to report, not to select. On a GPU each
recipe takes seconds, on 2 CPU cores about 15 minutes.

    python bench/demo_recipe_sweep.py --out /tmp/sweep \
        --recipe '{}' --recipe '{"learning_rate": 5e-5}' --recipe '{"temperature": 0.02}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from embtune.demo import DemoRecipe, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for one demo run per recipe")
    parser.add_argument("--data", default=None, help="SciFact folder (default: demo lookup)")
    parser.add_argument("--model", default=None, help="base model (default: demo default)")
    parser.add_argument("--limit", type=int, default=None, help="queries per split (smoke runs)")
    parser.add_argument(
        "--recipe", action="append", default=[], help="JSON overrides of DemoRecipe (repeatable)"
    )
    args = parser.parse_args()
    rows = []
    for i, text in enumerate(args.recipe or ["{}"]):
        overrides = json.loads(text)
        if "rank_range" in overrides:
            overrides["rank_range"] = tuple(overrides["rank_range"])
        recipe = replace(DemoRecipe(), **overrides)
        started = time.perf_counter()
        result = run_demo(
            Path(args.out) / f"r{i}", data=args.data, model=args.model, recipe=recipe,
            limit=args.limit, show_progress=False, log=lambda *_: None,
        )  # fmt: skip
        payload = json.loads((result.output_dir / "demo.json").read_text())
        history = [
            json.loads(line)
            for line in (result.output_dir / "model" / "train_log.jsonl").read_text().splitlines()
        ]
        dev = [h["dev_ndcg@10"] for h in history if "dev_ndcg@10" in h]
        rows.append(
            {
                "recipe": overrides,
                "test_ndcg@10": result.after["ndcg@10"],
                "test_recall@100": result.after["recall@100"],
                "test_mrr@10": result.after["mrr@10"],
                "dev_best_ndcg@10": max(dev) if dev else None,
                "dev_last_ndcg@10": dev[-1] if dev else None,
                "best_step": payload["best_dev_step"],
                "base_test_ndcg@10": result.before["ndcg@10"],
                "seconds": time.perf_counter() - started,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("\ncommand:", " ".join(sys.argv))
    print("| recipe | dev best nDCG@10 | test nDCG@10 | test R@100 | test MRR@10 | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{json.dumps(r['recipe'])}` | {r['dev_best_ndcg@10']:.4f} | "
            f"{r['test_ndcg@10']:.4f} | {r['test_recall@100']:.4f} | {r['test_mrr@10']:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
