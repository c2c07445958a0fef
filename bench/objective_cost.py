"""Cost per step of distillation and Matryoshka against the plain InfoNCE objective (CPU).

Each variant trains the same model on the same scored rows with the same batch, group size,
lengths and steps, in a fresh child process (`embtune train`), rounds interleaved (plain, kd,
..., plain, kd, ...) so a slow phase of the machine hits every variant alike. Seconds per step
are the median of `window_seconds` over the logged steps after the warm-up steps (model
loading, tokenization and the first steps excluded). Printed: seconds per step per variant,
its ratio to plain, each round's value (the machine's own spread), and the objective's own
forward + backward on a step's representations (milliseconds, no encoder), and each command.

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


def objective_milliseconds(extra: list[str], repeats: int = 50) -> float:
    """Median ms of one objective forward + backward on a step's representations alone
    (batch 16, group 4, width 384, scored groups): its own cost, free of the encoder's noise."""
    import time

    import torch

    from embtune.config import TrainConfig, add_arguments, resolve_config
    from embtune.data.batching import GroupLayout

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    required = ["--model", "m", "--train-data", "t", "-o", "o", "--temperature", "0.05"]
    config: TrainConfig = resolve_config(parser.parse_args([*required, *extra]))
    from embtune.objectives.from_options import objective_from_options

    objective = objective_from_options(config)
    batch, group, width = 16, 4, 384
    gen = torch.Generator().manual_seed(0)
    layout = GroupLayout(
        positive_index=torch.arange(batch) * group,
        passage_owner=torch.arange(batch).repeat_interleave(group),
        false_negative_mask=torch.zeros(batch, batch * group, dtype=torch.bool),
        passage_ids=torch.arange(batch * group),
        positive_ids=[],
        teacher_scores=torch.randn(batch * group, generator=gen),
    )
    times = []
    for _ in range(repeats):
        reps = {
            "queries": torch.randn(batch, width, generator=gen).requires_grad_(),
            "passages": torch.randn(batch * group, width, generator=gen).requires_grad_(),
        }
        started = time.perf_counter()
        objective(
            {k: torch.nn.functional.normalize(v, dim=-1) for k, v in reps.items()}, layout
        ).loss.backward()
        times.append(time.perf_counter() - started)
    return median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="scored FlagEmbedding rows")
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (packaged)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--objective-only", action="store_true", help="only the ms column")
    args = parser.parse_args()
    from embtune.demo import default_model

    base = [
        "train", "--model", args.model or default_model(), "--train-data", args.rows,
        "--batch-size", "16", "--train-group-size", "4", "--query-max-len", "64",
        "--passage-max-len", "256", "--temperature", "0.05", "--max-steps", str(args.steps),
        "--logging-steps", "1", "--save-steps", "0", "--seed", "42",
    ]  # fmt: skip
    if args.objective_only:
        for name, extra in VARIANTS.items():
            print(f"{name}: {objective_milliseconds(extra):.2f} ms")
        return 0
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, extra in VARIANTS.items():
            seconds[name].append(step_seconds([*base, *extra], args.warmup))
            print(f"round {round_ + 1}: {name}: {seconds[name][-1]:.3f} s/step", flush=True)
    own = {name: objective_milliseconds(extra) for name, extra in VARIANTS.items()}
    plain = median(seconds["plain (InfoNCE)"])
    lines = [
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"base command: `embtune {shlex.join(base)} -o DIR` plus each variant's options; "
        f"median over {args.rounds} rounds of the median step after {args.warmup} warm-up steps",
        "",
        "| objective | options | s/step | vs plain | rounds (s/step) | objective alone (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, extra in VARIANTS.items():
        value = median(seconds[name])
        rounds = " / ".join(f"{v:.2f}" for v in seconds[name])
        lines.append(
            f"| {name} | `{shlex.join(extra)}` | {value:.3f} | {value / plain:.3f}x | {rounds} | "
            f"{own[name]:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
