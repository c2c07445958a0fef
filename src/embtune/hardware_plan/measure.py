"""One measured grid point: a short, real `embtune train` run in a child process.

Why a child process per point: the peak of a process can only be read, not reset, in a portable
way; a fresh process per point measures exactly what a training run of those settings holds at
its peak (interpreter, libraries, model, optimizer state, activations), and a point that runs
out of memory kills only its child. The run is the real training code (the same speedups, step
strategy, optimizer), on worst-case rows (probe.py).

The peak is the one the run itself reports (train_summary.json: VmHWM on a CPU), not the
child's ``ru_maxrss`` from ``os.wait4``: Linux starts a child's ru_maxrss at its parent's
resident size, so every point would weigh at least as much as this planning process (measured:
a 13 MiB child of a process holding 1.5 GiB reports 1.5 GiB; a follow-up run started from a
long pytest session reported 2.03 GiB against a 0.66 GiB budget for that reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from embtune.run_files import LOG_FILE, SUMMARY_FILE

# Steps per point: the first allocates and meets its shapes, the others are timed.
STEPS_PER_POINT = 3


@dataclass(frozen=True)
class Point:
    """The settings of one measurement."""

    batch_size: int
    group_size: int
    cache_chunk_size: int = 0
    precision: str = "fp32"  # or "bf16"

    @property
    def texts(self) -> int:
        """Texts encoded per step: the queries and their groups of passages."""
        return self.batch_size * (1 + self.group_size)

    @property
    def graph_texts(self) -> int:
        """Texts whose activations are kept at once: the chunk under the cached loss."""
        return min(self.cache_chunk_size, self.texts) if self.cache_chunk_size else self.texts


@dataclass(frozen=True)
class Measurement:
    """What one point's run measured (``error`` set, numbers 0, when it failed)."""

    point: Point
    peak_bytes: int
    texts_per_second: float
    seconds: float  # the child's wall time, start-up included
    error: str = ""


def native_bf16(device: str) -> bool:
    """True when ``device`` computes bf16 matrix products natively (AVX512-BF16 or AMX on a
    CPU; on a GPU what torch reports). Elsewhere bf16 is emulated and slower than fp32."""
    if device == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def free_memory_bytes(device: str) -> int:
    """Memory a training run could take now: free GPU memory, or the CPU's MemAvailable."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def train_command(point: Point, model: str, probe_file: Path, out: Path, lengths: tuple[int, int]):
    """The `embtune train` command line of one point (``lengths``: query, passage max len)."""
    command = [
        sys.executable, "-m", "embtune", "train",
        "--model", model, "--train-data", str(probe_file), "--output-dir", str(out),
        "--overwrite-output-dir",
        "--batch-size", str(point.batch_size), "--train-group-size", str(point.group_size),
        "--query-max-len", str(lengths[0]), "--passage-max-len", str(lengths[1]),
        "--max-steps", str(STEPS_PER_POINT), "--logging-steps", "1", "--save-steps", "0",
        "--warmup-ratio", "0",
    ]  # fmt: skip
    if point.cache_chunk_size:
        command += ["--cache-chunk-size", str(point.cache_chunk_size)]
    if point.precision == "bf16":
        command.append("--bf16")
    return command


def _environment(device: str) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # measure the CPU even on a machine with a GPU
    return env


def _steady_rate(out: Path) -> float:
    # The first step allocates and meets its shapes: the rate is that of the steps after it.
    lines = (out / LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steady = [r for r in records if "window_texts" in r][1:]
    seconds = sum(r["window_seconds"] for r in steady)
    return sum(r["window_texts"] for r in steady) / seconds if seconds > 0 else 0.0


def measure(
    point: Point, model: str, probe_file: Path, work: Path, lengths: tuple[int, int], device: str
) -> Measurement:
    """Run ``point`` for STEPS_PER_POINT steps in a child `embtune train`; its peak and speed.

    The peak is the run's own (train_summary.json): its resident high-water mark on a CPU,
    max_memory_allocated on a GPU. A child that fails (out of memory included) gives a
    Measurement with ``error`` set and the last line it printed.
    """
    name = f"b{point.batch_size}-g{point.group_size}-c{point.cache_chunk_size}"
    out = work / f"{name}-{point.precision}"
    log = work / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        child = subprocess.Popen(
            train_command(point, model, probe_file, out, lengths),
            stdout=fh, stderr=subprocess.STDOUT, env=_environment(device),
        )  # fmt: skip
        try:
            status = child.wait()
        except BaseException:
            child.kill()  # an interrupted plan leaves no training run behind
            child.wait()
            raise
    seconds = time.perf_counter() - start
    if status != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        return Measurement(point, 0, 0.0, seconds, error=lines[-1][:300])
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return Measurement(point, int(summary["peak_memory_bytes"]), _steady_rate(out), seconds)
