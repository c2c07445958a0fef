"""The cached loss (GradCache) and cross-device negatives against the plain computation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embtune.data.batching import Batch
from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable
from embtune.kinds.bi_encoder import collate
from embtune.models.encoder import Encoder
from embtune.models.speedups.dropout import use_fast_cpu_dropout
from embtune.objectives.infonce import InfoNCE, contrastive_loss
from embtune.training.step import StepSettings, forward_backward
from tests.conftest import single_thread, subprocess_env

TEMPERATURE = 0.05


def make_batch(queries: int = 6, group: int = 3, seed: int = 0) -> tuple[Batch, list[TrainRow]]:
    """Random token ids of varied lengths; passage 1 of query 0 is also query 1's positive."""
    rng = np.random.default_rng(seed)
    q_tokens = [rng.integers(1000, 2000, size=rng.integers(3, 9)) for _ in range(queries)]
    p_count = queries * group
    p_tokens = [rng.integers(1000, 2000, size=rng.integers(4, 20)) for _ in range(p_count)]
    rows, groups = [], []
    for b in range(queries):
        ids = list(range(b * group, (b + 1) * group))
        pos = np.array([ids[0]] + ([0] if b == 1 else []))  # query 0's positive is also 1's
        rows.append(TrainRow(query=b, pos=pos, neg=np.array(ids[1:])))
        groups.append(Group(row=b, query=b, passages=ids))
    batch = collate(
        groups, rows, TokenTable.from_lists(q_tokens), TokenTable.from_lists(p_tokens), 0
    )
    return batch, rows


def load(tiny_model: Path, dropout: bool, fast_dropout: bool = False) -> Encoder:
    encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
    if fast_dropout:
        assert use_fast_cpu_dropout(encoder.model)
    if not dropout:
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    encoder.train()
    return encoder


def gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def reference_step(encoder: Encoder, batch: Batch, chunk: int) -> tuple[float, torch.Tensor]:
    """The full-graph loss and gradient, encoding in the same chunks (same dropout draws)."""

    def encode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, ids.shape[0], chunk):
            rows_mask = mask[start : start + chunk]
            width = int(rows_mask.sum(1).max())
            parts.append(encoder(ids[start : start + chunk, :width], rows_mask[:, :width]))
        return torch.cat(parts)

    passages = encode(
        batch.parts["passages"].input_ids, batch.parts["passages"].attention_mask
    )  # first, as ours
    queries = encode(batch.parts["queries"].input_ids, batch.parts["queries"].attention_mask)
    out = contrastive_loss(
        queries,
        passages,
        batch.layout.positive_index,
        batch.layout.passage_owner,
        TEMPERATURE,
        in_batch_negatives=True,
        false_negative_mask=batch.layout.false_negative_mask,
    )
    out.loss.backward()
    return out.loss.item(), gradients(encoder)


def cached_step(encoder: Encoder, batch: Batch, chunk: int) -> tuple[float, torch.Tensor]:
    result = forward_backward(
        encoder,
        batch,
        InfoNCE(TEMPERATURE),
        StepSettings(cache_chunk_size=chunk),
        lambda loss: loss.backward(),
        lambda loss: bool(torch.isfinite(loss)),
    )
    return result.loss.item(), gradients(encoder)


@pytest.mark.parametrize(("chunk", "fast"), [(1, False), (4, False), (5, True)])
def test_cached_loss_gradients_equal_the_full_graph_with_dropout_on(
    tiny_model, chunk, fast
) -> None:
    batch, _ = make_batch()
    with single_thread():
        encoder = load(tiny_model, dropout=True, fast_dropout=fast)
        torch.manual_seed(7)
        loss_ref, grad_ref = reference_step(encoder, batch, chunk)
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss, grad = cached_step(encoder, batch, chunk)
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(8)
        _, grad_other_dropout = cached_step(encoder, batch, chunk)
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert (grad - grad_ref).abs().max().item() < 1e-5
    # The dropout replay matters: other dropout draws give another gradient.
    assert (grad_other_dropout - grad_ref).abs().max().item() > 1e-4


def test_cached_loss_with_one_chunk_equals_the_plain_step(tiny_model) -> None:
    batch, _ = make_batch()
    with single_thread():
        encoder = load(tiny_model, dropout=True)
        torch.manual_seed(3)
        plain = forward_backward(
            encoder,
            batch,
            InfoNCE(TEMPERATURE),
            StepSettings(),
            lambda loss: loss.backward(),
            lambda loss: True,
        )
        grad_plain = gradients(encoder)
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss, grad = cached_step(encoder, batch, 10_000)
    assert loss == pytest.approx(plain.loss.item(), abs=1e-6)
    assert (grad - grad_plain).abs().max().item() < 1e-5
    assert plain.output.details.masked.sum().item() == 1  # the false negative was masked


@pytest.mark.parametrize("chunk", [0, 4])
def test_padding_to_a_multiple_changes_neither_loss_nor_gradients(tiny_model, chunk) -> None:
    """Extra padding is masked out; widths seen by the encoder are multiples of 8."""
    batch, _ = make_batch()
    wide_batch, _ = make_batch()
    for part in wide_batch.parts.values():
        extra = -part.width % 8
        part.input_ids = torch.nn.functional.pad(part.input_ids, (0, extra))
        part.attention_mask = torch.nn.functional.pad(part.attention_mask, (0, extra))
    widths: list[int] = []
    with single_thread():
        encoder = load(tiny_model, dropout=False)
        results = []
        for b, multiple in ((batch, 1), (wide_batch, 8)):
            widths.clear()
            hook = encoder.model.register_forward_pre_hook(
                lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                with_kwargs=True,
            )
            result = forward_backward(
                encoder,
                b,
                InfoNCE(TEMPERATURE),
                StepSettings(cache_chunk_size=chunk, pad_to_multiple_of=multiple),
                lambda loss: loss.backward(),
                lambda loss: True,
            )
            hook.remove()
            results.append((result.loss.item(), gradients(encoder), list(widths)))
            encoder.zero_grad(set_to_none=True)
    (loss, grad, narrow), (wide_loss, wide_grad, wide) = results
    assert wide_loss == pytest.approx(loss, abs=1e-6)
    assert (wide_grad - grad).abs().max().item() < 1e-5
    assert all(w % 8 == 0 for w in wide) and any(w % 8 for w in narrow)


def test_a_non_finite_loss_back_propagates_nothing(tiny_model) -> None:
    batch, _ = make_batch()
    encoder = load(tiny_model, dropout=False)
    for chunk in (0, 3):
        result = forward_backward(
            encoder,
            batch,
            InfoNCE(TEMPERATURE),
            StepSettings(cache_chunk_size=chunk),
            lambda loss: pytest.fail("backward called"),
            lambda loss: False,
        )
        assert not result.finite
        assert all(p.grad is None for p in encoder.parameters())


# --- cross-device negatives: 2 processes (gloo) against one process on the union batch --------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, chunk: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        union, rows = make_batch(queries=6)
        groups = [Group(row=b, query=b, passages=list(range(b * 3, b * 3 + 3))) for b in range(6)]
        share = np.array_split(np.arange(6), world)[rank]
        rng = np.random.default_rng(0)
        q_tokens = [rng.integers(1000, 2000, size=rng.integers(3, 9)) for _ in range(6)]
        p_tokens = [rng.integers(1000, 2000, size=rng.integers(4, 20)) for _ in range(18)]
        local = collate(
            [groups[b] for b in share],
            rows,
            TokenTable.from_lists(q_tokens),
            TokenTable.from_lists(p_tokens),
            0,
        )
        encoder = load(Path(model_dir), dropout=False)
        result = forward_backward(
            encoder,
            local,
            InfoNCE(TEMPERATURE),
            StepSettings(
                cache_chunk_size=chunk, negatives_cross_device=True, shared_parts=("passages",)
            ),
            lambda loss: loss.backward(),
            lambda loss: True,
            loss_weight=len(share) * world / 6,
        )
        grad = gradients(encoder)
        dist.all_reduce(grad)  # what DDP does, then divides by the process count
        loss = torch.tensor([result.loss.item() * len(share) / 6])
        dist.all_reduce(loss)
        if rank == 0:
            torch.save(
                {
                    "loss": loss.item(),
                    "grad": grad / world,
                    "candidates": result.output.details.candidates.tolist(),
                },
                out,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk", [0, 2])
def test_cross_device_negatives_equal_one_process_on_the_union_batch(
    tiny_model, tmp_path, chunk
) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_model), chunk, str(out)), nprocs=2)
    two = torch.load(out)

    union, _ = make_batch(queries=6)
    with single_thread():
        encoder = load(tiny_model, dropout=False)
        single = forward_backward(
            encoder,
            union,
            InfoNCE(TEMPERATURE),
            StepSettings(),
            lambda loss: loss.backward(),
            lambda loss: True,
        )
        grad = gradients(encoder)
    # The two-process loss is a sum of per-process means: another summation order in float32,
    # a few units in the last place at 3.13 (one is 2.4e-7); measured 1.4e-6 apart in CI.
    assert two["loss"] == pytest.approx(single.loss.item(), rel=2e-6)
    assert (two["grad"] - grad).abs().max().item() < 1e-5
    # Every query of rank 0 saw all 18 passages (query 1 minus its masked false negative).
    assert two["candidates"] == [18, 17, 18]


def write_topic_rows(data: Path) -> Path:
    """8 rows, each a question with its answer and 3 unrelated negatives (torchrun tests)."""
    with data.open("w") as fh:
        for i in range(8):
            record = {
                "query": f"question {i} about topic {i}",
                "pos": [f"answer {i} on topic {i}"],
                "neg": [f"unrelated text {i} {j}" for j in range(3)],
            }
            fh.write(json.dumps(record) + "\n")
    return data


def test_torchrun_trains_with_cross_device_negatives(tiny_model, tmp_path) -> None:
    data = write_topic_rows(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "embtune", "train",
        "--model", str(tiny_model), "--train-data", str(data), "--output-dir", str(out),
        "--batch-size", "2", "--train-group-size", "4", "--max-steps", "2",
        "--logging-steps", "1", "--save-steps", "0", "--negatives-cross-device",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # 2 processes x 2 queries x 4 passages: every query is scored against all 16.
    assert all(r["candidates_per_query"] == 16 for r in steps)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert "candidates each query is scored against: 16" in done.stdout


def test_cross_device_without_in_batch_negatives_is_refused(tiny_model, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embtune", "train", "--model", str(tiny_model), "--train-data",
         "x.jsonl", "-o", str(tmp_path / "o"), "--negatives-cross-device",
         "--no-in-batch-negatives"],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--negatives-cross-device" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
