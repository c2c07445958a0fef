"""Distillation objectives against hand computations and FlagEmbedding's formulas.

The FlagEmbedding references below are written from its documented semantics
(``AbsEmbedderModel.distill_loss`` and the in-batch loss around it: teacher targets are
``softmax(teacher_scores)`` over each query's group, student scores ``q.p / temperature``,
groups laid out query after query), on dense [B, B*G] score matrices.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embtune.config import TrainConfig
from embtune.data.batching import GroupLayout
from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable
from embtune.kinds.bi_encoder import collate
from embtune.models.encoder import Encoder
from embtune.objectives.distillation import (
    KLDistillation,
    M3Distillation,
    MarginMSE,
    distillation_objective,
    teacher_view,
)
from embtune.objectives.infonce import contrastive_loss
from embtune.training.step import StepSettings, forward_backward
from tests.conftest import single_thread

B, G, H = 3, 4, 8
TAU = 0.05


def _layout(teacher: torch.Tensor | None) -> GroupLayout:
    """B groups of G passages each, laid out one after another, positive first."""
    owner = torch.arange(B).repeat_interleave(G)
    return GroupLayout(
        positive_index=torch.arange(B) * G,
        passage_owner=owner,
        false_negative_mask=torch.zeros(B, B * G, dtype=torch.bool),
        passage_ids=torch.arange(B * G),
        positive_ids=[np.array([b * G]) for b in range(B)],
        teacher_scores=None if teacher is None else teacher.flatten(),
    )


@pytest.fixture
def step() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    reps = {
        "queries": F.normalize(torch.randn(B, H, generator=gen), dim=-1),
        "passages": F.normalize(torch.randn(B * G, H, generator=gen), dim=-1),
    }
    teacher = torch.randn(B, G, generator=gen) * 3
    return reps, teacher


def _flag_kl_div(reps, teacher, tau) -> torch.Tensor:
    scores = reps["queries"] @ reps["passages"].T / tau  # [B, B*G]
    local = torch.stack([scores[b, b * G : (b + 1) * G] for b in range(B)])
    targets = torch.softmax(teacher, dim=-1)
    soft = -torch.mean(torch.sum(torch.log_softmax(local, dim=-1) * targets, dim=-1))
    hard = F.cross_entropy(scores, torch.arange(B) * G)
    return soft + hard


def _flag_m3(reps, teacher, tau) -> torch.Tensor:
    scores = reps["queries"] @ reps["passages"].T / tau
    targets = torch.softmax(teacher, dim=-1)
    labels = torch.arange(B) * G
    total, mask = torch.zeros(()), torch.zeros_like(scores)
    for i in range(G):
        per_query = F.cross_entropy(scores + mask, labels + i, reduction="none")
        total = total + torch.mean(targets[:, i] * per_query)
        mask[torch.arange(B), labels + i] = torch.finfo(scores.dtype).min
    return total


def test_kl_div_with_infonce_equals_flagembeddings_formula(step) -> None:
    reps, teacher = step
    config = TrainConfig(temperature=TAU, knowledge_distillation=True)
    out = distillation_objective(config)(reps, _layout(teacher))
    assert out.loss.item() == pytest.approx(_flag_kl_div(reps, teacher, TAU).item(), abs=1e-5)
    assert set(out.terms) == {"infonce", "kl_div"}


def test_m3_kd_loss_equals_flagembeddings_formula(step) -> None:
    reps, teacher = step
    out = M3Distillation(TAU)(reps, _layout(teacher))
    assert out.loss.item() == pytest.approx(_flag_m3(reps, teacher, TAU).item(), abs=1e-5)


def test_margin_mse_is_the_mean_squared_margin_error(step) -> None:
    reps, teacher = step
    scores = reps["queries"] @ reps["passages"].T / TAU
    expected = []
    for b in range(B):
        for j in range(1, G):
            student = scores[b, b * G] - scores[b, b * G + j]
            target = (teacher[b, 0] - teacher[b, j]) / 2.0
            expected.append((student - target) ** 2)
    out = MarginMSE(TAU, teacher_temperature=2.0)(reps, _layout(teacher))
    assert out.loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_the_teacher_temperature_divides_the_teacher_scores(step) -> None:
    reps, teacher = step
    warm = KLDistillation(TAU, teacher_temperature=4.0)(reps, _layout(teacher)).loss
    same = KLDistillation(TAU)(reps, _layout(teacher / 4.0)).loss
    assert warm.item() == pytest.approx(same.item(), abs=1e-6)


def test_an_unscored_slot_is_left_out_of_the_soft_term(step) -> None:
    reps, teacher = step
    holey = teacher.clone()
    holey[0, 3] = math.nan  # a corpus fill: no teacher score
    holey[1, 1:] = math.nan  # one scored passage only: no distribution to learn
    out = KLDistillation(TAU)(reps, _layout(holey))
    scores = reps["queries"] @ reps["passages"].T / TAU
    by_hand = []
    for b, slots in ((0, [0, 1, 2]), (2, [0, 1, 2, 3])):
        student = torch.log_softmax(scores[b, [b * G + j for j in slots]], dim=0)
        target = torch.softmax(teacher[b, slots], dim=0)
        by_hand.append(-(target * student).sum())
    assert out.loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), abs=1e-5)
    sums = out.signal_sums()
    assert sums["kd_queries"] == 2 and sums["unscored_group_slots"] == 4


def test_the_agreement_signals_match_a_hand_count(step) -> None:
    reps, teacher = step
    out = KLDistillation(TAU)(reps, _layout(teacher))
    sums = out.signal_sums()
    scores = reps["queries"] @ reps["passages"].T
    local = torch.stack([scores[b, b * G : (b + 1) * G] for b in range(B)])
    agree = (teacher.argmax(1) == local.argmax(1)).sum().item()
    p = torch.softmax(teacher, 1)
    entropy = -(p * p.log()).sum().item()
    rho = []
    for b in range(B):
        rt, rs = (x.argsort().argsort().double() for x in (teacher[b], local[b]))
        rho.append(np.corrcoef(rt.numpy(), rs.numpy())[0, 1])
    assert sums["top1_agreement"] == agree
    assert sums["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert sums["rank_correlation"] == pytest.approx(sum(rho), abs=1e-6)
    record = KLDistillation(TAU).window_record(sums, 0.0)
    assert record["top1_agreement"] == pytest.approx(agree / B)


def test_m3_without_scores_is_infonce(step) -> None:
    reps, _ = step
    layout = _layout(None)
    m3 = M3Distillation(TAU)(reps, layout).loss
    infonce = contrastive_loss(
        reps["queries"], reps["passages"], layout.positive_index, layout.passage_owner, TAU
    ).loss
    assert m3.item() == pytest.approx(infonce.item(), abs=1e-6)


@pytest.mark.parametrize("kd_loss_type", ["kl_div", "m3_kd_loss", "margin_mse"])
def test_cached_gradients_equal_the_plain_paths(tiny_model, kd_loss_type: str) -> None:
    """GradCache caches representations: every distillation loss gets the plain gradient."""
    rng = np.random.default_rng(3)
    rows = [
        TrainRow(query=b, pos=np.array([3 * b]), neg=np.array([3 * b + 1, 3 * b + 2]),
                 pos_scores=rng.normal(size=1), neg_scores=rng.normal(size=2))
        for b in range(4)
    ]  # fmt: skip
    groups = [
        Group(row=b, query=b, passages=[3 * b, 3 * b + 1, 3 * b + 2],
              scores=[float(rows[b].pos_scores[0]), *rows[b].neg_scores.tolist()])
        for b in range(4)
    ]  # fmt: skip
    queries = TokenTable.from_lists([rng.integers(1000, 2000, size=5) for _ in range(4)])
    passages = TokenTable.from_lists(
        [rng.integers(1000, 2000, size=rng.integers(4, 12)) for _ in range(12)]
    )
    batch = collate(groups, rows, queries, passages, 0)
    assert batch.layout.teacher_scores is not None
    objective = distillation_objective(
        TrainConfig(temperature=TAU, knowledge_distillation=True, kd_loss_type=kd_loss_type)
    )
    grads = []
    with single_thread():
        encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
        encoder.eval()
        for chunk in (0, 3):
            forward_backward(
                encoder, batch, objective, StepSettings(cache_chunk_size=chunk),
                lambda loss: loss.backward(), lambda loss: True,
            )  # fmt: skip
            grads.append(
                torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
            )
            encoder.zero_grad(set_to_none=True)
    scale = grads[0].abs().max().item()
    assert scale > 0
    # 1e-5 of the largest gradient: margin_mse's gradients are 1/temperature times larger.
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5 * max(1.0, scale), scale


def test_the_view_lists_each_groups_passages_positive_first() -> None:
    layout = _layout(torch.arange(B * G, dtype=torch.float32).view(B, G))
    reps = {"queries": torch.eye(B, H), "passages": torch.eye(B * G, H)}
    view = teacher_view(reps, layout, 1.0, 1.0)
    assert view.columns.tolist() == [[b * G + j for j in range(G)] for b in range(B)]
    assert view.scored.all()


def test_every_kd_loss_type_names_a_registered_objective() -> None:
    from embtune.choices import KD_LOSS_TYPES
    from embtune.objectives import OBJECTIVES

    assert set(KD_LOSS_TYPES) <= set(OBJECTIVES)
    for name in KD_LOSS_TYPES:
        config = TrainConfig(knowledge_distillation=True, kd_loss_type=name)
        assert name in distillation_objective(config).name.split("+")


def _scored_batch(share: list[int]):  # noqa: ANN202
    """Queries ``share`` of 6 scored groups of 3 (tokens and scores fixed by a seed)."""
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(6, 3)) * 2
    rows = [
        TrainRow(query=b, pos=np.array([3 * b]), neg=np.array([3 * b + 1, 3 * b + 2]),
                 pos_scores=scores[b, :1], neg_scores=scores[b, 1:])
        for b in range(6)
    ]  # fmt: skip
    groups = [
        Group(row=b, query=b, passages=[3 * b, 3 * b + 1, 3 * b + 2], scores=scores[b].tolist())
        for b in share
    ]
    queries = TokenTable.from_lists([rng.integers(1000, 2000, size=5) for _ in range(6)])
    passages = TokenTable.from_lists(
        [rng.integers(1000, 2000, size=rng.integers(4, 12)) for _ in range(18)]
    )
    return collate(groups, rows, queries, passages, 0)


def _kd_worker(rank: int, port: int, model_dir: str, kd_loss_type: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        share = [0, 1, 2] if rank == 0 else [3, 4, 5]
        encoder = Encoder.from_pretrained(Path(model_dir), pooling="mean")
        encoder.eval()
        config = TrainConfig(
            temperature=TAU, knowledge_distillation=True, kd_loss_type=kd_loss_type
        )
        result = forward_backward(
            encoder, _scored_batch(share), distillation_objective(config),
            StepSettings(negatives_cross_device=True, shared_parts=("passages",)),
            lambda loss: loss.backward(), lambda loss: True,
        )  # fmt: skip
        grad = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
        dist.all_reduce(grad)
        loss = torch.tensor([result.loss.item() / 2])
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss.item(), "grad": grad / 2}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kd_loss_type", ["kl_div", "m3_kd_loss", "margin_mse"])
def test_cross_device_distillation_equals_one_process_on_the_union_batch(
    tiny_model, tmp_path, kd_loss_type: str
) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_kd_worker, args=(port, str(tiny_model), kd_loss_type, str(out)), nprocs=2)
    two = torch.load(out)
    config = TrainConfig(temperature=TAU, knowledge_distillation=True, kd_loss_type=kd_loss_type)
    with single_thread():
        encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
        encoder.eval()
        single = forward_backward(
            encoder, _scored_batch(list(range(6))), distillation_objective(config),
            StepSettings(), lambda loss: loss.backward(), lambda loss: True,
        )  # fmt: skip
        grad = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    assert two["loss"] == pytest.approx(single.loss.item(), abs=1e-5)
    assert (two["grad"] - grad).abs().max().item() < 1e-5 * max(1.0, grad.abs().max().item())
