"""`embtune plan`: the memory line, the recommendation rule, the grid, bad input, the plan's
own command line, and a real follow-up run that stays within the budget the plan was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embtune.errors import UsageError
from embtune.hardware_plan.grid import measure_grid
from embtune.hardware_plan.measure import Measurement, Point
from embtune.hardware_plan.memory_budget import parse_size
from embtune.hardware_plan.memory_fit import fit_line
from embtune.hardware_plan.recommend import choose_point, recommended_options
from tests.conftest import subprocess_env

MIB, GIB = 2**20, 2**30


def synthetic_peak(texts: int, fixed: float = 1.0 * GIB, per_text: float = 10 * MIB) -> float:
    """A cost model with a known line."""
    return fixed + per_text * texts


def test_fit_recovers_a_synthetic_cost_model() -> None:
    sizes = [5, 10, 20, 40, 80]
    fit = fit_line(sizes, [synthetic_peak(t) for t in sizes])
    assert fit.fixed == pytest.approx(GIB, rel=1e-9)
    assert fit.per_text == pytest.approx(10 * MIB, rel=1e-9)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.is_linear()
    assert fit.largest_within(2 * GIB) == 102  # (2 GiB - 1 GiB) / 10 MiB, rounded down


def test_fit_flags_a_cost_that_is_not_a_line() -> None:
    sizes = [5, 10, 20, 40, 80]
    fit = fit_line(sizes, [GIB + 2 * MIB * t * t for t in sizes])
    assert not fit.is_linear()
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        fit_line([8, 8], [GIB, GIB])


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GiB", 20 * GIB),
        ("512MiB", 512 * MIB),
        ("1.5G", int(1.5 * GIB)),
        ("2048", 2048),
        ("3 gb", 3 * GIB),
    ],  # fmt: skip
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "-1", "0", "1.5 parsecs", ""])
def test_bad_memory_sizes_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="--memory-budget"):
        parse_size(text)


def test_recommendation_is_the_largest_batch_that_fits() -> None:
    fit = fit_line([5, 80], [synthetic_peak(5), synthetic_peak(80)])
    point = choose_point(fit, 2 * GIB, 4, "fp32", None, 128, measured_texts=160)
    assert point == Point(20, 4, 0, "fp32")  # 102 texts fit: 20 queries x (1 + 4)
    assert synthetic_peak(point.texts) <= 2 * GIB
    assert synthetic_peak((point.batch_size + 1) * 5) > 2 * GIB
    assert choose_point(fit, 2 * GIB, 4, "fp32", None, 8, 160).batch_size == 8  # the cap
    # Beyond the measured 80 texts the line is trusted with a 10% margin: (2 GiB / 1.1 - 1 GiB)
    # / 10 MiB = 83 texts -> 16 queries.
    assert choose_point(fit, 2 * GIB, 4, "fp32", None, 128, 80).batch_size == 16


def test_a_wanted_batch_too_large_switches_on_the_cached_loss() -> None:
    fit = fit_line([5, 80], [synthetic_peak(5), synthetic_peak(80)])
    point = choose_point(fit, 2 * GIB, 4, "bf16", 64, 128, measured_texts=160)
    assert (point.batch_size, point.group_size) == (64, 4)
    assert point.cache_chunk_size == 80  # 102 texts x 4/5 (passages fill chunks), multiple of 8
    assert synthetic_peak(point.graph_texts) <= 2 * GIB
    assert recommended_options(point) == {
        "batch_size": 64, "train_group_size": 4, "cache_chunk_size": 80, "bf16": True,
    }  # fmt: skip
    with pytest.raises(UsageError, match="below what the model needs"):
        choose_point(fit, 0.5 * GIB, 4, "fp32", None, 128, 160)


def _fake_run(seconds: float = 1.0):  # noqa: ANN202
    measured: list[Point] = []

    def run(point: Point) -> Measurement:
        measured.append(point)
        return Measurement(point, int(synthetic_peak(point.texts)), 10.0, seconds)

    return run, measured


def test_grid_stops_before_the_budget() -> None:
    run, measured = _fake_run()
    grid = measure_grid(run, 4, "fp32", 2 * GIB, 128, 1e9)
    # batches 1..16 fit (80 texts: 1.78 GiB); 32 (160 texts) is predicted over 2 GiB
    assert [p.batch_size for p in measured] == [1, 2, 4, 8, 16]
    assert all(m.peak_bytes <= 2 * GIB for m in grid)


def test_grid_keeps_to_the_time_limit_and_the_largest_batch() -> None:
    run, measured = _fake_run(seconds=10.0)
    measure_grid(run, 4, "fp32", 100 * GIB, 128, time_limit=25.0)
    assert [p.batch_size for p in measured] == [1, 2]  # a third point would end past 25 s
    run, measured = _fake_run()
    measure_grid(run, 4, "fp32", 100 * GIB, 4, 1e9)
    assert [p.batch_size for p in measured] == [1, 2, 4]


def _embtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embtune", *args], cwd=cwd, env=subprocess_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def write_rows(path: Path, rows: int = 24, words_per_passage: int = 40) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as fh:
        for i in range(rows):
            length = words_per_passage + 7 * (i % 5)
            text = " ".join(words[(i + j) % len(words)] for j in range(length))
            row = {"query": f"query {i} {words[i % 12]}", "pos": [f"{text} {i}"],
                   "neg": [f"{text} other {i} {k}" for k in range(4)]}  # fmt: skip
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--memory-budget", "abc"], "--memory-budget: expected a size"),
        (["--headroom", "1.5"], "--headroom: a fraction"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(
    tmp_path: Path, tiny_model: Path, extra: list[str], message: str
) -> None:
    data = write_rows(tmp_path / "train.jsonl")
    done = _embtune("plan", "--model", str(tiny_model), "--train-data", str(data), *extra,
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_missing_data_is_refused_before_measuring(tmp_path: Path, tiny_model: Path) -> None:
    done = _embtune("plan", "--model", str(tiny_model), "--train-data", "nope.jsonl",
                    "--write-config", "run.yaml", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert "nope.jsonl" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "run.yaml").exists()


def small_model(folder: Path) -> Path:
    """A 2-layer, 128-wide BERT: activations large enough against the process's own memory
    that a budget between two batch sizes binds (the 32-wide fixture's barely grow)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import minilm_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=512)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_recommendation_stays_within_its_budget_in_a_real_run(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", words_per_passage=300)
    model = small_model(tmp_path / "model")
    common = ["--model", str(model), "--train-data", str(data), "--train-group-size", "4"]
    done = _embtune("plan", *common, "--max-batch-size", "4", "--json", "plan.json",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    peaks = {m["batch_size"]: m["peak_bytes"] for m in plan["measurements"]}
    assert sorted(peaks) == [1, 2, 4]
    # A budget that binds: between what batch 2 and batch 4 measured.
    budget = (peaks[2] + peaks[4]) // 2
    done = _embtune("plan", *common, "--max-batch-size", "4", "--memory-budget", str(budget),
                    "--write-config", "run.yaml", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    options = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert options["batch_size"] < 4, done.stdout  # the budget binds
    # The follow-up starts from a process holding more than the budget, as a long pytest
    # session does in CI: a child's ru_maxrss would start at that size (the bug this guards),
    # the run's own peak (VmHWM) does not.
    ballast = b"x" * budget
    done = _embtune("train", "--config", "run.yaml", "--output-dir", "out", "--max-steps", "3",
                    "--save-steps", "0", cwd=tmp_path)  # fmt: skip
    del ballast
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert 0 < summary["peak_memory_bytes"] <= budget, (summary["peak_memory_bytes"], budget)
