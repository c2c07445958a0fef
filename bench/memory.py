"""Peak memory vs batch size: embtune's plain path vs the cached loss (--cache-chunk-size).

For each batch size, embtune trains a few steps twice in fresh child processes: plainly, and
with the cached contrastive loss (GradCache: embed in chunks without activations, then
re-encode chunk by chunk with gradients). The cached path's peak should stay flat as the
batch grows, at a bounded step-time cost. A run that runs out of memory is reported as OOM.

Peak memory: CPU = the child's peak RSS (os.wait4), GPU = torch.cuda.max_memory_allocated in
the child. Step time: the median of embtune's per-step log over the timed steps.

CPU (all-MiniLM-L6-v2, fp32; ~6 min on 2 cores):
    nice -n 19 .venv/bin/python bench/memory.py --out bench/results/memory-cpu.md \\
        --plot bench/results/memory-cpu.png
GPU (random-init BERT-base-size model, bf16, chunk 64; plain OOMs at large batches; ~5 min):
    python3 bench/memory.py --device cuda --out $OUT/memory.md --plot $OUT/memory.png
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_DATA,
    DEFAULT_WORK,
    ChildRun,
    as_dict,
    bench_model,
    child_command,
    command_line,
    count_rows,
    default_pythons,
    embtune_step_seconds,
    gib,
    load_average,
    machine_info,
    markdown_table,
    prepare_train_data,
    run_child,
    write_outputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; device-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    p.add_argument(
        "--model",
        help="model folder (default: all-MiniLM-L6-v2 on cpu, random-init BERT-base on cuda)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder for the cuda model")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="SciFact BEIR folder (%(default)s)")
    p.add_argument("--train-data", help="FlagEmbedding jsonl instead of the generated file")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="queries per step (default: 4 8 16 32 on cpu, 64 256 1024 4096 on cuda)",
    )
    p.add_argument(
        "--cache-chunk-size",
        type=int,
        help="texts per chunk of the cached path (default: 16 cpu, 64 cuda)",
    )
    p.add_argument("--group-size", type=int, default=4, help="(4)")
    p.add_argument("--query-max-len", type=int, default=64, help="(64)")
    p.add_argument("--passage-max-len", type=int, default=256, help="(256)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="(default: fp32 cpu, bf16 cuda)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (2)")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=("plain", "cached"),
        default=["plain", "cached"],
        help="which paths to run (both)",
    )
    p.add_argument("--embtune-args", default="", help="extra `embtune train` options for every run")
    p.add_argument("--embtune-python", help="python for embtune (default: .venv or this one)")
    p.add_argument(
        "--retry-after-oom",
        action="store_true",
        help="run larger batches of a path that already ran out of memory (default: report "
        "them as OOM without running)",
    )
    p.add_argument("--work", default=str(DEFAULT_WORK), help="work folder (%(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the runs' output folders")
    p.add_argument("--plot", help="write a PNG of peak memory vs batch size (matplotlib)")
    p.add_argument(
        "--out", action="append", default=[], help="write the report (.md or .json; repeatable)"
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch_sizes = args.batch_sizes or ([64, 256, 1024, 4096] if cuda else [4, 8, 16, 32])
    args.cache_chunk_size = args.cache_chunk_size or (64 if cuda else 16)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


def run_one(
    args: argparse.Namespace,
    python: str,
    model: Path,
    train_file: Path,
    work: Path,
    batch: int,
    mode: str,
) -> dict[str, Any]:
    """Train warm-up + timed steps at one batch size in one mode; peak memory and step time."""
    name = f"{mode}-b{batch}"
    out = work / "memory-runs" / name
    result = work / "memory-runs" / f"{name}.result.json"
    shutil.rmtree(out, ignore_errors=True)
    result.unlink(missing_ok=True)
    total = args.warmup_steps + args.steps
    cmd = child_command(
        python,
        "embtune",
        result,
        "--",
        "train",
        "--model", str(model),
        "--train-data", str(train_file),
        "--output-dir", str(out),
        "--overwrite-output-dir",
        "--batch-size", str(batch),
        "--train-group-size", str(args.group_size),
        "--query-max-len", str(args.query_max_len),
        "--passage-max-len", str(args.passage_max_len),
        "--pooling", "mean",
        "--max-steps", str(total),
        "--logging-steps", "1",
        "--save-steps", "0",
        "--cache-dir", str(work / "token-cache"),
        *(["--bf16"] if args.precision == "bf16" else []),
        *(["--cache-chunk-size", str(args.cache_chunk_size)] if mode == "cached" else []),
        *shlex.split(args.embtune_args),
    )  # fmt: skip
    run = ChildRun(f"{mode} batch {batch}", "embtune", cmd)
    print(f"\n[{run.label}] load {load_average()}\n  $ {run.shell_command}")
    run_child(run, out.with_suffix(".log"))
    run.result = json.loads(result.read_text()) if result.is_file() else {}
    row: dict[str, Any] = {"batch": batch, "mode": mode, "run": as_dict(run)}
    if reason := run.failed_reason():
        row["failed"] = reason
    else:
        seconds, _ = embtune_step_seconds(out)
        timed = [seconds[k] for k in range(args.warmup_steps + 1, total + 1) if k in seconds]
        row["median_step_seconds"] = median(timed) if timed else None
        row["peak_rss_bytes"] = run.peak_rss_bytes
        row["peak_memory_bytes"] = (
            run.peak_rss_bytes
            if args.device == "cpu"
            else run.result.get("cuda_max_allocated_bytes")
        )
        summary = out / "train_summary.json"
        if summary.is_file():
            row["embtune_reported_peak_bytes"] = json.loads(summary.read_text()).get(
                "peak_memory_bytes"
            )
    shown = row.get("failed") or (
        f"peak {gib(row['peak_memory_bytes'])}, median step {row['median_step_seconds']:.3f} s"
    )
    print(f"  {shown}; wall {run.wall_seconds:.0f} s")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def cell(row: dict | None, key: str) -> str:
    """A table cell: the value, OOM / failure, or '-' when the mode was not run."""
    if row is None:
        return "-"
    if "failed" in row:
        return row["failed"] if row["failed"] == "OOM" else "failed"
    value = row.get(key)
    if value is None:
        return "?"
    return gib(value) if key.endswith("bytes") else f"{value:.3f}"


def plot(path: str, args: argparse.Namespace, rows: list[dict]) -> None:
    """Peak memory (GiB) vs batch size, one line per mode, OOM marked at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max((r.get("peak_memory_bytes") or 0) for r in rows) / 1024**3 or 1.0
    for mode, marker in (("plain", "o"), ("cached", "s")):
        ok = [r for r in rows if r["mode"] == mode and r.get("peak_memory_bytes")]
        label = mode if mode == "plain" else f"cached (chunk {args.cache_chunk_size})"
        ax.plot(
            [r["batch"] for r in ok],
            [r["peak_memory_bytes"] / 1024**3 for r in ok],
            marker=marker,
            label=label,
        )
        for r in rows:
            if r["mode"] == mode and r.get("failed") == "OOM":
                ax.plot([r["batch"]], [top * 1.05], marker="x", color="red")
                ax.annotate(f"{mode} OOM", (r["batch"], top * 1.05), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (queries per step)")
    ax.set_ylabel("peak memory (GiB)" + (" RSS" if args.device == "cpu" else " GPU allocated"))
    ax.set_title(f"embtune peak memory ({args.device}, {args.precision})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"command: {command_line()}\nmachine: {json.dumps(info)}")
    python = args.embtune_python or default_pythons(args.device)["embtune"]
    needed = max(args.batch_sizes) * (args.warmup_steps + args.steps)
    if args.train_data:
        train_file = Path(args.train_data)
        note = f"training data: {train_file} ({count_rows(train_file)} rows)"
    else:
        train_file = work / f"scifact-train-{needed}.jsonl"
        note = prepare_train_data(Path(args.data), train_file, needed, args.group_size - 1)
    model = bench_model(args.device, args.model, args.tokenizer, work)
    print(f"note: {note}\nmodel: {model}")

    rows = []
    oom_at: dict[str, int] = {}
    for batch in sorted(args.batch_sizes):
        for mode in args.modes:
            if mode in oom_at and not args.retry_after_oom:
                # A larger batch of the same path runs out of memory too; its start-up is saved.
                rows.append({"batch": batch, "mode": mode, "failed": "OOM", "skipped": True})
                print(f"\n[{mode} batch {batch}] skipped: OOM at batch {oom_at[mode]} already")
                continue
            row = run_one(args, python, model, train_file, work, batch, mode)
            if row.get("failed") == "OOM":
                oom_at[mode] = batch
            rows.append(row)

    found = {(r["batch"], r["mode"]): r for r in rows}
    kind = "peak RSS" if args.device == "cpu" else "peak GPU allocated"
    header = [
        "batch",
        "texts/step",
        f"plain {kind}",
        f"cached {kind}",
        "plain s/step",
        "cached s/step",
        "cached/plain step time",
    ]
    lines = []
    for batch in args.batch_sizes:
        plain, cached = found.get((batch, "plain")), found.get((batch, "cached"))
        ratio = "-"
        if (
            plain
            and cached
            and plain.get("median_step_seconds")
            and cached.get("median_step_seconds")
        ):
            ratio = f"{cached['median_step_seconds'] / plain['median_step_seconds']:.2f}x"
        lines.append(
            [
                batch,
                batch * (1 + args.group_size),
                cell(plain, "peak_memory_bytes"),
                cell(cached, "peak_memory_bytes"),
                cell(plain, "median_step_seconds"),
                cell(cached, "median_step_seconds"),
                ratio,
            ]
        )
    cached_ok = [r for r in rows if r["mode"] == "cached" and r.get("peak_memory_bytes")]
    md = [
        f"# Peak memory vs batch size ({args.device}, {args.precision}, group {args.group_size}, "
        f"lengths {args.query_max_len}/{args.passage_max_len}, cache chunk "
        f"{args.cache_chunk_size})",
        "",
        markdown_table(header, lines),
        "",
    ]
    if len(cached_ok) >= 2:
        low, high = cached_ok[0], cached_ok[-1]
        growth = high["peak_memory_bytes"] / low["peak_memory_bytes"]
        md += [
            f"- cached path: peak at batch {high['batch']} is {growth:.2f}x the peak at batch "
            f"{low['batch']} ({gib(low['peak_memory_bytes'])} -> "
            f"{gib(high['peak_memory_bytes'])}; flat = close to 1x)",
        ]
    md += [
        f"- command: `{command_line()}`",
        f"- {note}",
        f"- model: {model}" + (" (random init)" if not args.model and args.device != "cpu" else ""),
        f"- step time: median of embtune's per-step log over {args.steps} steps after "
        f"{args.warmup_steps} warm-up",
        f"- machine: {json.dumps(info)}",
        "",
        "## Runs",
        "",
    ]
    for r in rows:
        if "run" not in r:
            md += [f"- {r['mode']} batch {r['batch']}: not run (OOM at a smaller batch)"]
            continue
        run = r["run"]
        md += [
            f"- {run['label']}: wall {run['wall_seconds']:.0f} s, load {run['load_before']} -> "
            f"{run['load_after']}, {json.dumps(run['result'].get('versions', {}))}",
            "",
            "  ```",
            f"  {run['shell_command']}",
            "  ```",
        ]
    markdown = "\n".join(md)
    print("\n" + markdown)
    payload = {
        "command": command_line(),
        "options": vars(args),
        "machine": info,
        "note": note,
        "rows": rows,
    }
    write_outputs(args.out, markdown, payload)
    if args.plot:
        plot(args.plot, args, rows)
    failed = [r for r in rows if "failed" in r and r["failed"] != "OOM"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
