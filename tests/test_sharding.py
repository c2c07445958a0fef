"""Sharded training (--fsdp, issue 15): two CPU processes on gloo, each holding half of every
weight (PyTorch FSDP2 through accelerate), train as an unsharded run does: the same losses and
weights (to float rounding) as one process with the same global batch, with the cached loss,
cross-device negatives, dev evaluations, best/, checkpoints and a killed run resumed; LoRA
adapters with gradient checkpointing too. The saved folders are the unsharded layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from embtune.checkpoint import KILL_AT_STEP_ENV
from embtune.models.encoder import Encoder
from tests.conftest import subprocess_env
from tests.test_decoder_models import run_in_process, train_argv
from tests.test_train_step import _free_port, write_topic_rows

# Cached loss, cross-device negatives, a dev set evaluated every 2 steps, best/ kept,
# checkpoints every 2 steps: every path that touches the sharded model.
RUN = ("--max-steps", "6", "--cache-chunk-size", "2", "--negatives-cross-device", "--save-best",
       "--dev-fraction", "0.25", "--eval-steps", "2", "--save-steps", "2")  # fmt: skip


def torchrun(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "embtune", *argv]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(**env), timeout=300
    )


def logged(out: Path, key: str) -> list[float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(a), load_file(b)
    assert sorted(first) == sorted(second)
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topic_rows(tmp_path_factory.mktemp("rows") / "train.jsonl")


def test_a_killed_sharded_run_resumes_to_the_unsharded_result(
    tiny_qwen2: Path, rows: Path, tmp_path: Path
) -> None:
    sharded = tmp_path / "sharded"
    argv = train_argv(tiny_qwen2, rows, sharded, *RUN, "--fsdp", "full_shard")
    killed = torchrun(argv, **{KILL_AT_STEP_ENV: "3"})
    assert killed.returncode != 0
    resumed = torchrun([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert resumed.stdout.count("model saved to") == 1  # the main process speaks, once
    # The same global batch in one process, unsharded.
    whole = tmp_path / "whole"
    one = train_argv(tiny_qwen2, rows, whole, *RUN)
    assert run_in_process([*one, "--batch-size", "4"]) == 0
    assert logged(sharded, "dev_ndcg@10") == pytest.approx(logged(whole, "dev_ndcg@10"))
    for name in ("model.safetensors", "best/model.safetensors"):
        assert largest_difference(sharded / name, whole / name) < 1e-5
    # Checkpoints hold accelerate's sharded state (optimizer, model) beside the full model.
    state = sharded / "checkpoint-4" / "training_state"
    assert (state / "optimizer_0").is_dir() and (state / "pytorch_model_fsdp_0").is_dir()
    texts = ["a protein study", "gene result"]
    ours = Encoder.from_pretrained(str(sharded)).encode(texts, 16)
    theirs = SentenceTransformer(str(sharded), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sharded_lora_with_gradient_checkpointing_trains_the_unsharded_adapter(
    tiny_qwen2: Path, rows: Path, tmp_path: Path
) -> None:
    # No LoRA dropout: one process draws other masks than two.
    lora = ("--use-lora", "--lora-rank", "4", "--lora-dropout", "0", "--gradient-checkpointing",
            "--negatives-cross-device", "--max-steps", "3")  # fmt: skip
    sharded = tmp_path / "sharded"
    done = torchrun(train_argv(tiny_qwen2, rows, sharded, *lora, "--fsdp", "shard_grad_op"))
    assert done.returncode == 0, done.stderr[-3000:]
    whole = tmp_path / "whole"
    assert run_in_process(train_argv(tiny_qwen2, rows, whole, *lora, "--batch-size", "4")) == 0
    name = "adapter_model.safetensors"
    assert largest_difference(sharded / name, whole / name) < 1e-5
    assert not (sharded / "model.safetensors").exists()  # the adapter only, as unsharded


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--model-kind", "cross-encoder"), "--fsdp with --model-kind"),
        (("--interpolate-base", "auto"), "--fsdp with --interpolate-base"),
        (("--use-lora", "--save-merged-lora-model"), "--fsdp with --save-merged-lora-model"),
    ],
)
def test_what_sharding_cannot_do_yet_is_refused_with_the_way_around(
    tiny_qwen2: Path,
    rows: Path,
    tmp_path: Path,
    extra: tuple[str, ...],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = train_argv(tiny_qwen2, rows, tmp_path / "run", "--fsdp", "full_shard", *extra)
    assert run_in_process(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
