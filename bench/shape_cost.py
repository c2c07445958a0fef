"""What a batch shape met for the first time costs, per attention backend (a GPU diagnostic).

In the H100 run of bench/train_throughput.py, every embtune step whose query batch had a width
no earlier step had was 0.1-3.4 s slower than the ~0.18 s of a step with a width already met
(docs/performance.md). This script isolates that: a BERT encoder (random init) in training mode
runs forward + backward on padded batches [batch, width] under bf16 autocast (fp32 on CPU),
each width twice: the first call pays whatever is planned or compiled per shape, the second
shows the steady cost. It does so once with PyTorch's default scaled-dot-product-attention
backends and once with the cuDNN backend switched off, on different widths so that neither
inherits the other's plans, and names the attention kernels that ran (torch.profiler).

GPU (~1 min):   python3 bench/shape_cost.py --out $OUT/shape-cost.md
CPU smoke test: .venv/bin/python bench/shape_cost.py --size tiny --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import default_device, markdown_table, publish, setup_lines  # noqa: E402

SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
}
ATTENTION_KERNEL_WORDS = ("attention", "fmha", "flash", "cudnn", "sdpa", "softmax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cuda", "cpu"), help="(default: cuda when available)")
    p.add_argument("--size", choices=tuple(SIZES), default="base", help="encoder size (base)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch (64)")
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[37, 41, 45, 49, 53],
        help="widths for the default backends; +1 each for cuDNN off (37 41 45 49 53)",
    )
    p.add_argument("--out", action="append", default=[], help="report (.md or .json)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    return args


def make_model(size: str, device: str):  # noqa: ANN201
    """A random-init BERT encoder with SDPA attention, in training mode (dropout on)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dims = SIZES[size]
    config = BertConfig(vocab_size=30522, intermediate_size=4 * dims["hidden_size"], **dims)
    config._attn_implementation = "sdpa"
    model = BertModel(config, add_pooling_layer=False).to(device)
    return model.train()


def batch(batch_size: int, width: int, device: str):  # noqa: ANN201
    """Random ids [batch, width]; a quarter of the rows are half as long (padding)."""
    import torch

    ids = torch.randint(1000, 30000, (batch_size, width), device=device)
    mask = torch.ones_like(ids)
    mask[: batch_size // 4, width // 2 :] = 0
    return ids, mask


def step_seconds(model, ids, mask, device: str) -> float:  # noqa: ANN001
    """One forward + backward (mean-pooled embedding sum as the loss), synchronized."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden.float().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def attention_kernels(model, ids, mask, device: str) -> list[str]:  # noqa: ANN001
    """Names of the attention-looking kernels (or CPU ops) one forward + backward ran."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step_seconds(model, ids, mask, device)
    names = sorted({e.key for e in prof.key_averages()})
    return [n for n in names if any(w in n.lower() for w in ATTENTION_KERNEL_WORDS)][:12]


def measure(args: argparse.Namespace, cudnn: bool, widths: list[int]) -> dict:
    """First and second call per width, and the attention kernels, with cuDNN SDPA on/off."""
    import torch

    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    model = make_model(args.size, args.device)
    warm_ids, warm_mask = batch(args.batch_size, 32, args.device)
    for _ in range(2):  # cuBLAS handles, allocator, autocast: not shape costs
        step_seconds(model, warm_ids, warm_mask, args.device)
    rows = []
    for width in widths:
        ids, mask = batch(args.batch_size, width, args.device)
        first = step_seconds(model, ids, mask, args.device)
        second = step_seconds(model, ids, mask, args.device)
        rows.append({"width": width, "first_seconds": first, "second_seconds": second})
        model.zero_grad(set_to_none=True)
    kernels = attention_kernels(
        model, *batch(args.batch_size, widths[-1], args.device), args.device
    )
    return {
        "cudnn_sdpa": cudnn,
        "rows": rows,
        "median_first_seconds": median(r["first_seconds"] for r in rows),
        "median_second_seconds": median(r["second_seconds"] for r in rows),
        "attention_kernels": kernels,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure both settings and write the report."""

    args = parse_args(argv)
    settings = [(True, args.widths)]
    if args.device == "cuda":
        settings.append((False, [w + 1 for w in args.widths]))
    results = [measure(args, cudnn, widths) for cudnn, widths in settings]
    header = ["cuDNN SDPA", "width", "first call s", "second call s", "first - second s"]
    lines = []
    for result in results:
        label = "on (default)" if result["cudnn_sdpa"] else "off"
        if args.device != "cuda":
            label = "n/a (cpu)"
        for r in result["rows"]:
            extra = r["first_seconds"] - r["second_seconds"]
            lines.append(
                [label, r["width"], f"{r['first_seconds']:.3f}", f"{r['second_seconds']:.3f}",
                 f"{extra:.3f}"]
            )  # fmt: skip
    md = [
        f"# Cost of a batch shape met for the first time ({args.device}, BERT-{args.size}, "
        f"batch {args.batch_size}, forward + backward"
        + (", bf16 autocast)" if args.device == "cuda" else ", fp32)"),
        "",
        markdown_table(header, lines),
        "",
    ]
    for result in results:
        setting = "on" if result["cudnn_sdpa"] else "off"
        md.append(
            f"- cuDNN SDPA {setting if args.device == 'cuda' else 'n/a (cpu)'}: median first call "
            f"{result['median_first_seconds']:.3f} s, median second call "
            f"{result['median_second_seconds']:.3f} s; attention kernels: "
            + (", ".join(f"`{k}`" for k in result["attention_kernels"]) or "none matched")
        )
    publish(args.out, md + setup_lines(args.device), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
