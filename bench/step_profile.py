"""Where a training step's time goes: plain vs cached loss on one fixed batch (a GPU diagnostic).

In the H100 run of bench/train_throughput.py the cached loss (chunks of 64) took 1.98x the
plain step even on steps whose batch widths had been met before (0.36 s vs 0.18 s median),
where one extra forward pass without a graph should cost about 1.33x. This script times
embtune's own step (``train_step.forward_backward`` under accelerate's mixed precision, plus a
fused AdamW step) on one fixed batch, so no step meets a new shape: the plain path and the
cached path at several chunk sizes, each repeated after warm-up. It prints the median step
time, the ratio to the plain step, how long the host took to issue the step against how long
the device was busy (torch.profiler), and the top kernels per variant.

GPU (~1-2 min):   python3 bench/step_profile.py --out $OUT/step-profile.md
CPU smoke test:   .venv/bin/python bench/step_profile.py --device cpu --model /tmp/tiny \\
                      --batch-size 8 --chunks 8 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from _common import (  # noqa: E402
    DEFAULT_WORK,
    bench_model,
    default_device,
    markdown_table,
    publish,
    setup_lines,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cuda", "cpu"), help="(default: cuda when available)")
    p.add_argument("--model", help="model folder (default: random BERT-base, as train_throughput)")
    p.add_argument("--tokenizer", help="tokenizer folder for the default model")
    p.add_argument("--batch-size", type=int, default=64, help="queries (64)")
    p.add_argument("--group-size", type=int, default=4, help="passages per query (4)")
    p.add_argument("--query-width", type=int, default=45, help="padded query width (45)")
    p.add_argument("--passage-width", type=int, default=256, help="padded passage width (256)")
    p.add_argument(
        "--chunks", type=int, nargs="+", default=[64, 128, 320], help="cached chunk sizes"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (5)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="work folder (%(default)s)")
    p.add_argument("--out", action="append", default=[], help="report (.md or .json)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    return args


def fixed_batch(args: argparse.Namespace, vocab: int):  # noqa: ANN201
    """One Batch of random ids: 1 positive + (group - 1) negatives per query, some padding."""
    import numpy as np
    import torch

    from embtune.data.batching import Batch

    rng = np.random.default_rng(0)
    b, g = args.batch_size, args.group_size

    def padded(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(rng.integers(1000, vocab - 1, (rows, width)))
        mask = torch.ones_like(ids)
        lengths = rng.integers(width // 2, width + 1, rows)
        lengths[0] = width
        for i, n in enumerate(lengths):
            mask[i, n:] = 0
            ids[i, n:] = 0
        return ids, mask

    q_ids, q_mask = padded(b, args.query_width)
    p_ids, p_mask = padded(b * g, args.passage_width)
    return Batch(
        query_input_ids=q_ids,
        query_attention_mask=q_mask,
        passage_input_ids=p_ids,
        passage_attention_mask=p_mask,
        positive_index=torch.arange(b) * g,
        passage_owner=torch.arange(b).repeat_interleave(g),
        false_negative_mask=torch.zeros(b, b * g, dtype=torch.bool),
        rows=list(range(b)),
        passage_ids=torch.arange(b * g),
        positive_ids=[np.array([i * g]) for i in range(b)],
    )


def profile_variant(args: argparse.Namespace, model_dir: Path, chunk: int) -> dict:
    """Median step time, host vs device time and top kernels of one variant (chunk 0: plain)."""
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    from embtune.models.encoder import Encoder
    from embtune.training.step import StepSettings, forward_backward

    cuda = args.device == "cuda"
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=cuda)
    model, optimizer = accelerator.prepare(encoder, optimizer)
    model.train()
    batch = fixed_batch(args, encoder.tokenizer.vocab_size).to(accelerator.device)
    settings = StepSettings(temperature=0.05, cache_chunk_size=chunk)

    def step() -> None:
        forward_backward(
            model, batch, settings, accelerator.backward, lambda loss: bool(torch.isfinite(loss))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(2):
        timed()
    seconds = [timed() for _ in range(args.repeats)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        issued = time.perf_counter()
        step()
        host = time.perf_counter() - issued
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        device_total = sum(e.self_device_time_total for e in events) / 1e6
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
        top_kernels = [(e.key[:70], e.self_device_time_total / 1e3, e.count) for e in top]
    else:
        device_total = None
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        top_kernels = [(e.key[:70], e.self_cpu_time_total / 1e3, e.count) for e in top]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {
        "variant": "plain" if not chunk else f"cached, chunk {chunk}",
        "chunk": chunk,
        "step_seconds": seconds,
        "median_seconds": median(seconds),
        "host_issue_seconds_profiled": host,
        "device_busy_seconds_profiled": device_total,
        "top": top_kernels,
        "peak_allocated_bytes": peak,
    }


def main(argv: list[str] | None = None) -> int:
    """Profile the plain path and each chunk size; write the report."""
    import torch

    args = parse_args(argv)
    model_dir = bench_model(args.device, args.model, args.tokenizer, Path(args.work))
    results = []
    for chunk in [0, *args.chunks]:
        results.append(profile_variant(args, model_dir, chunk))
        if args.device == "cuda":  # the next variant's peak is its own
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    plain = results[0]["median_seconds"]
    header = ["variant", "median s/step", "vs plain", "host issue s", "device busy s", "peak"]
    lines = []
    for r in results:
        busy = r["device_busy_seconds_profiled"]
        peak = r["peak_allocated_bytes"]
        lines.append(
            [
                r["variant"],
                f"{r['median_seconds']:.3f}",
                f"{r['median_seconds'] / plain:.2f}x",
                f"{r['host_issue_seconds_profiled']:.3f}",
                f"{busy:.3f}" if busy is not None else "-",
                f"{peak / 2**30:.2f} GiB" if peak else "-",
            ]
        )
    texts = args.batch_size * (1 + args.group_size)
    md = [
        f"# One training step, plain vs cached ({args.device}): {args.batch_size} queries x "
        f"{args.query_width} + {args.batch_size * args.group_size} passages x "
        f"{args.passage_width} tokens ({texts} texts), same batch every step",
        "",
        markdown_table(header, lines),
        "",
        "Host issue: wall time until the step's Python returned (kernels may still run); "
        "device busy: sum of kernel times in the profiled step. Host close to the step time "
        "and device well below it means the step waits on the host.",
        "",
    ]
    for r in results:
        md.append(
            f"- {r['variant']}: " + "; ".join(f"`{k}` {ms:.1f} ms x{n}" for k, ms, n in r["top"])
        )
    publish(args.out, [*md, "", *setup_lines(args.device, f"model: {model_dir}")], results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
