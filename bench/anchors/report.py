"""Collect the anchor runs' numbers (standard library only; run with any python).

summarize --out-dir DIR --system NAME [--version-python PY --packages P ...]
    reads DIR/time.txt (/usr/bin/time -v of the training process), DIR/train.log,
    DIR/train_info.json (if any), DIR/eval.json, DIR/*_command.txt and writes
    DIR/summary.json.
table --runs DIR ... [--base-eval FILE] --markdown FILE --json FILE [--note TEXT ...]
    writes the markdown table and all raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def parse_time_v(text: str) -> dict:
    out: dict = {}
    if m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
        out["peak_rss_kib"] = int(m.group(1))
        out["peak_rss_gib"] = round(int(m.group(1)) / 1024**2, 2)
    if m := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
        seconds = 0.0
        for part in m.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["process_wall_s"] = round(seconds, 1)
    for key, label in (("user_s", "User time (seconds)"), ("system_s", "System time (seconds)")):
        if m := re.search(re.escape(label) + r": ([\d.]+)", text):
            out[key] = float(m.group(1))
    if m := re.search(r"Percent of CPU this job got: (\d+)%", text):
        out["cpu_percent"] = int(m.group(1))
    if m := re.search(r"Exit status: (\d+)", text):
        out["exit_status"] = int(m.group(1))
    return out


def parse_train_log(text: str) -> dict:
    """The Hugging Face Trainer's final metrics line, e.g. {'train_runtime': '806.1', ...}."""
    out: dict = {}
    for key in (
        "train_runtime",
        "train_loss",
        "train_samples_per_second",
        "train_steps_per_second",
    ):
        found = re.findall(rf"'{key}': '?([0-9.eE+-]+)'?", text)
        if found:
            out[key] = float(found[-1])
    losses = re.findall(r"'loss': '?([0-9.eE+-]+)'?", text)
    if losses:
        out["logged_losses"] = [float(x) for x in losses]
    return out


def package_versions(python: str, packages: list[str]) -> dict:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    try:
        res = subprocess.run(
            [python, "-c", code, *packages], capture_output=True, text=True, check=True
        )
        return json.loads(res.stdout)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as exc:
        return {"error": str(exc)}


def summarize(args: argparse.Namespace) -> None:
    d = Path(args.out_dir)
    summary: dict = {"system": args.system}
    summary.update(parse_time_v(_read(d / "time.txt")))
    summary.update(parse_train_log(_read(d / "train.log")))
    info_file = d / "train_info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        summary["train_info"] = info
        if info.get("train_runtime") is not None:
            summary["train_runtime"] = float(info["train_runtime"])
    ev = json.loads((d / "eval.json").read_text())
    summary["eval"] = ev
    for name in ("train_command", "eval_command"):
        summary[name] = _read(d / f"{name}.txt").strip()
    if args.version_python:
        summary["versions"] = package_versions(args.version_python, args.packages)
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{args.system}: nDCG@10 {ev['ndcg@10']:.4f}  Recall@100 {ev['recall@100']:.4f}  "
        f"MRR@10 {ev['mrr@10']:.4f}  train {summary.get('train_runtime')} s  "
        f"peak RSS {summary.get('peak_rss_gib')} GiB"
    )


def table(args: argparse.Namespace) -> None:
    rows = []
    raw: dict = {
        "runs": [],
        "notes": args.note,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": __import__("os").cpu_count(),
        },
    }
    if args.base_eval:
        ev = json.loads(Path(args.base_eval).read_text())
        cmd = _read(Path(args.base_eval).with_name("eval_command.txt")).strip()
        raw["base"] = {"eval": ev, "eval_command": cmd}
        rows.append(("all-MiniLM-L6-v2, no fine-tuning", ev, "–", "–", "–"))
    for run in args.runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        raw["runs"].append(s)
        rows.append(
            (
                s["system"],
                s["eval"],
                f"{s['train_runtime']:.0f}" if s.get("train_runtime") is not None else "?",
                f"{s['peak_rss_gib']:.2f} GiB" if s.get("peak_rss_gib") is not None else "?",
                f"{s['user_s'] + s['system_s']:.0f}" if "user_s" in s and "system_s" in s else "?",
            )
        )
    lines = [
        "| system | nDCG@10 | Recall@100 | MRR@10 | training s | peak RSS "
        "| CPU s (training process) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system, ev, secs, rss, cpu in rows:
        lines.append(
            f"| {system} | {ev['ndcg@10']:.4f} | {ev['recall@100']:.4f} | {ev['mrr@10']:.4f} "
            f"| {secs} | {rss} | {cpu} |"
        )
    md = [args.title, "", *lines, ""]
    md += ["## Commands", ""]
    if "base" in raw:
        md += [
            "- all-MiniLM-L6-v2, no fine-tuning, evaluation:",
            "",
            "  ```",
            f"  {raw['base']['eval_command']}",
            "  ```",
            "",
        ]
    for s in raw["runs"]:
        md += [f"- {s['system']}, training:", "", "  ```", f"  {s['train_command']}", "  ```", ""]
        md += ["  evaluation:", "", "  ```", f"  {s['eval_command']}", "  ```", ""]
    if args.note:
        md += ["## Notes", ""] + [f"- {n}" for n in args.note] + [""]
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text("\n".join(md))
    Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--system", required=True)
    s.add_argument("--version-python")
    s.add_argument("--packages", nargs="*", default=[])
    t = sub.add_parser("table")
    t.add_argument("--runs", nargs="+", required=True)
    t.add_argument("--base-eval")
    t.add_argument("--markdown", required=True)
    t.add_argument("--json", required=True)
    t.add_argument("--title", default="# Anchor runs")
    t.add_argument("--note", action="append", default=[])
    args = p.parse_args()
    summarize(args) if args.cmd == "summarize" else table(args)


if __name__ == "__main__":
    main()
