"""Cost per step of distillation and Matryoshka against the plain InfoNCE objective (CPU).

Each variant trains the same model on the same scored rows with the same batch, group size,
lengths and steps, in a fresh child process (`embtune train`), rounds interleaved (plain, kd,
..., plain, kd, ...) so a slow phase of the machine hits every variant alike. Seconds per step
are the median of `window_seconds` over the logged steps after the warm-up steps (model
loading, tokenization and the first steps excluded). Printed: seconds per step per variant,
its ratio to plain, and each command.

    .venv/bin/python bench/objective_cost.py --rows /tmp/embtune-distill/train-scored.jsonl \\
        --out bench/results/objective-cost-cpu.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

VARIANTS = {
    "plain (InfoNCE)": [],
    "kl_div + InfoNCE": ["--knowledge-distillation", "--teacher-temperature", "0.05"],
    "m3_kd_loss": ["--knowledge-distillation", "--kd-loss-type", "m3_kd_loss"],
    "margin_mse": ["--knowledge-distillation", "--kd-loss-type", "margin_mse"],
    "Matryoshka 384/256/128/64": ["--matryoshka-dims", "384", "256", "128", "64"],
    "kl_div + Matryoshka": [
        "--knowledge-distillation", "--teacher-temperature", "0.05",
        "--matryoshka-dims", "384", "256", "128", "64",
    ],
}  # fmt: skip


def step_seconds(argv: list[str], warmup: int) -> float:
    """Median seconds per step of one `embtune train` run after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        done = subprocess.run(
            [sys.executable, "-m", "embtune", *argv, "-o", str(out)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"failed: {shlex.join(argv)}\n{done.stderr[-2000:]}")
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        times = [r["window_seconds"] for r in log if "window_seconds" in r and r["step"] > warmup]
        return median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="scored FlagEmbedding rows")
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (packaged)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    from embtune.demo import default_model

    base = [
        "train", "--model", args.model or default_model(), "--train-data", args.rows,
        "--batch-size", "16", "--train-group-size", "4", "--query-max-len", "64",
        "--passage-max-len", "256", "--temperature", "0.05", "--max-steps", str(args.steps),
        "--logging-steps", "1", "--save-steps", "0", "--seed", "42",
    ]  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, extra in VARIANTS.items():
            seconds[name].append(step_seconds([*base, *extra], args.warmup))
            print(f"round {round_ + 1}: {name}: {seconds[name][-1]:.3f} s/step", flush=True)
    plain = median(seconds["plain (InfoNCE)"])
    lines = [
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"base command: `embtune {shlex.join(base)} -o DIR` plus each variant's options; "
        f"median over {args.rounds} rounds of the median step after {args.warmup} warm-up steps",
        "",
        "| objective | options | s/step | vs plain |",
        "|---|---|---|---|",
    ]
    for name, extra in VARIANTS.items():
        value = median(seconds[name])
        lines.append(f"| {name} | `{shlex.join(extra)}` | {value:.3f} | {value / plain:.3f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
