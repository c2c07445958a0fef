"""Corpus encoding speed: embtune's Encoder.encode_passages vs SentenceTransformer.encode.

Both encode the same passages (the SciFact corpus as embtune reads it: title + " " + text, or
its first --limit documents) with the same model, batch size and max length, in this one
process (same torch, same threads), alternating which goes first in each repeat. Timed: the
encode call only (tokenization included for both; model loading excluded), after one small
warm-up call each. Also checks that the two agree (max absolute difference of the
embeddings).

CPU (2 cores; all-MiniLM-L6-v2, fp32, batch 64, max length 256; ~6-12 min with 2 repeats):
    nice -n 19 .venv/bin/python bench/encode.py --out bench/results/encode-cpu.md
Smoke test:
    .venv/bin/python bench/encode.py --limit 64 --repeats 1

Options the lead adds to embtune's encoder pass through: --encoder-option KEY=VALUE goes to
Encoder.from_pretrained, --encode-option KEY=VALUE to encode_passages (values are Python
literals, else strings), e.g. --encode-option precision=bf16.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DEFAULT_DATA,
    ROOT,
    command_line,
    load_average,
    machine_info,
    markdown_table,
    minilm_path,
    write_outputs,
)


def key_values(items: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE strings as a dict; a value is a Python literal when it parses as one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="BEIR folder (%(default)s)")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents (0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch, both tools (64)")
    p.add_argument("--max-len", type=int, default=256, help="max tokens per passage (256)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per tool (2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--encoder-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for embtune's Encoder.from_pretrained (repeatable)",
    )
    p.add_argument(
        "--encode-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for embtune's Encoder.encode_passages (repeatable)",
    )
    p.add_argument(
        "--out", action="append", default=[], help="write the report (.md or .json; repeatable)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from embtune.data.formats import load_beir
    from embtune.models.encoder import Encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"command: {command_line()}\nmachine: {json.dumps(info)}")
    model_path = Path(args.model) if args.model else minilm_path()
    corpus = list(load_beir(Path(args.data), "test").corpus.values())
    texts = corpus[: args.limit] if args.limit else corpus
    encoder_kwargs = key_values(args.encoder_option, "--encoder-option")
    encode_kwargs = key_values(args.encode_option, "--encode-option")

    ours = Encoder.from_pretrained(
        str(model_path), passage_max_len=args.max_len, **encoder_kwargs
    ).to(args.device)
    theirs = SentenceTransformer(str(model_path), device=args.device)
    theirs.max_seq_length = args.max_len
    if ours.settings.passage_instruction:
        print(f"note: embtune adds the passage instruction {ours.settings.passage_instruction!r}")

    def run_ours(batch: list[str]) -> torch.Tensor:
        return ours.encode_passages(batch, batch_size=args.batch_size, **encode_kwargs)

    def run_theirs(batch: list[str]) -> torch.Tensor:
        return theirs.encode(
            batch, batch_size=args.batch_size, convert_to_tensor=True, show_progress_bar=False
        )

    tools = {"embtune": run_ours, "sentence-transformers": run_theirs}
    warm = texts[: min(len(texts), 2 * args.batch_size)]
    for fn in tools.values():
        fn(warm)

    seconds: dict[str, list[float]] = {name: [] for name in tools}
    loads: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            before = load_average()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            emb = tools[name](texts)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
            loads.append(f"{name} {before} -> {load_average()}")
            outputs.setdefault(name, emb.float().cpu())
            print(
                f"repeat {r + 1} {name}: {len(texts) / seconds[name][-1]:.1f} texts/s "
                f"({seconds[name][-1]:.1f} s, load {before} -> {load_average()})"
            )

    a, b = outputs["embtune"], outputs["sentence-transformers"]
    max_diff = (a - b).abs().max().item()
    min_cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    rate = {name: len(texts) / median(secs) for name, secs in seconds.items()}
    ratio = rate["embtune"] / rate["sentence-transformers"]
    rows = [
        [name, f"{rate[name]:.1f}", f"{median(secs):.2f}", ", ".join(f"{s:.2f}" for s in secs)]
        for name, secs in seconds.items()
    ]
    md = [
        f"# Corpus encoding ({args.device}): {len(texts)} passages, batch {args.batch_size}, "
        f"max length {args.max_len}",
        "",
        markdown_table(["tool", "texts/s (median)", "median s", "each repeat s"], rows),
        "",
        f"- embtune / sentence-transformers: {ratio:.2f}x (target on CPU: >= 1.5x: "
        f"{'met' if ratio >= 1.5 else 'NOT met'})",
        f"- embeddings agree: max |difference| {max_diff:.2e}, min cosine {min_cos:.6f}",
        f"- command: `{command_line()}`",
        f"- model: {model_path}; passages: {args.data} corpus (title + ' ' + text)"
        + (f", first {args.limit}" if args.limit else ""),
        f"- embtune options: from_pretrained {encoder_kwargs}, encode_passages {encode_kwargs}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"sentence-transformers {sentence_transformers.__version__}",
        f"- load averages: {'; '.join(loads)}",
        f"- machine: {json.dumps(info)}",
    ]
    markdown = "\n".join(md)
    print("\n" + markdown)
    payload = {
        "command": command_line(),
        "options": vars(args),
        "machine": info,
        "texts": len(texts),
        "seconds": seconds,
        "texts_per_second": rate,
        "ratio": ratio,
        "max_abs_diff": max_diff,
        "min_cosine": min_cos,
        "loads": loads,
        "versions": {
            "torch": torch.__version__,
            "sentence-transformers": sentence_transformers.__version__,
        },
    }
    write_outputs(args.out, markdown, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
