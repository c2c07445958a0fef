"""Step time and peak memory of a small decoder embedder (CPU): full fine-tune against LoRA,
plain against the cached loss (issue 15).

The model is a Qwen2-style decoder with random weights (speed and memory do not depend on the
weights), built here at ``--hidden``/``--layers`` and saved with all-MiniLM-L6-v2's tokenizer
(a real vocabulary, so lengths are real; its [SEP] ends every text, so no EOS is appended).
Every variant trains it on SciFact's train queries (negatives drawn from its corpus)
with the same batch, group, lengths and steps in a fresh child process (`embtune train`),
rounds interleaved so a slow phase of the machine hits every variant alike. Seconds per step
are the median of ``window_seconds`` after the warm-up steps; peak memory is the run's own
VmHWM (train_summary.json ``peak_memory_bytes``), which includes the loaded model.

    .venv/bin/python bench/decoder_cost.py --out bench/results/decoder-cost-cpu.md
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "scifact"
LORA = ["--use-lora", "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0.05"]
VARIANTS = {
    "full": [],
    "full, cached (chunk 8)": ["--cache-chunk-size", "8"],
    "LoRA r16": LORA,
    "LoRA r16, cached (chunk 8)": [*LORA, "--cache-chunk-size", "8"],
}


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    """A Qwen2-style decoder with random weights and MiniLM's tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from embtune.demo import default_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model())
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=1024,
    )
    Qwen2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_variant(argv: list[str], warmup: int) -> tuple[float, float]:
    """(median seconds per step after ``warmup`` steps, peak GiB) of one `embtune train` run."""
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
        summary = json.loads((out / "train_summary.json").read_text())
        return median(times), summary["peak_memory_bytes"] / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="training data (BEIR folder)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "decoder", args.hidden, args.layers)
        base = [
            "train", "--model", str(model), "--train-data", args.data,
            "--pooling", "last_token", "--padding-side", "left",
            "--batch-size", "8", "--train-group-size", "4", "--query-max-len", "64",
            "--passage-max-len", "256", "--max-steps", str(args.steps), "--logging-steps", "1",
            "--save-steps", "0", "--seed", "42", "--cache-dir", str(Path(tmp) / "cache"),
        ]  # fmt: skip
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            for name, extra in VARIANTS.items():
                results[name].append(run_variant([*base, *extra], args.warmup))
                seconds, peak = results[name][-1]
                print(f"round {round_ + 1}: {name}: {seconds:.3f} s/step, {peak:.2f} GiB")
    full_s = median(s for s, _ in results["full"])
    full_m = median(m for _, m in results["full"])
    lines = [
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"Qwen2-style decoder, hidden {args.hidden}, {args.layers} layers, random weights; base "
        f"command: `embtune {shlex.join(base)} -o DIR` (the model folder is a temporary one) "
        f"plus each variant's options; median over {args.rounds} rounds of the median step "
        f"after {args.warmup} warm-up steps; peak = the run's VmHWM",
        "",
        "| variant | options | s/step | vs full | peak GiB | vs full | rounds (s/step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, extra in VARIANTS.items():
        seconds = median(s for s, _ in results[name])
        peak = median(m for _, m in results[name])
        rounds = " / ".join(f"{s:.2f}" for s, _ in results[name])
        lines.append(
            f"| {name} | `{shlex.join(extra)}` | {seconds:.3f} | {seconds / full_s:.2f}x | "
            f"{peak:.2f} | {peak / full_m:.2f}x | {rounds} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
