"""The seams of the training loop, shown by worked examples (docs/architecture.md):

* adding an objective: a toy "alignment" objective, combined with InfoNCE by WeightedSum,
  trained end to end, and run through the cached (GradCache) strategy unchanged;
* adding a model kind: a toy kind (a bi-encoder padded on the left, as decoder models are)
  registered in MODEL_KINDS and trained by name;
* the layout rules: no function in src/embtune over 120 lines.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from embtune import api
from embtune.config import TrainConfig
from embtune.data.batching import GroupLayout
from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable
from embtune.kinds import MODEL_KINDS
from embtune.kinds.bi_encoder import BiEncoder, collate
from embtune.models.encoder import Encoder
from embtune.objectives import InfoNCE, ObjectiveOutput, WeightedSum
from embtune.run_files import LOG_FILE
from embtune.training.run import train
from embtune.training.step import StepSettings, forward_backward
from tests.conftest import ROOT, single_thread


class Alignment:
    r"""Toy objective: :math:`\frac{1}{B}\sum_b (1 - q_b \cdot p_b^+)`, each query pulled to its
    positive (no negatives). Inputs: ``queries`` [B, H], ``passages`` [P, H] (normalized).
    """

    name = "alignment"

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        queries, passages = representations["queries"], representations["passages"]
        positives = passages[layout.positive_index]
        gap = 1 - (queries * positives).sum(-1)
        loss = gap.mean()

        def sums() -> dict[str, float]:
            return {"queries": float(len(gap)), "gap": float(gap.detach().sum())}

        return ObjectiveOutput(loss, {self.name: loss}, sums)

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        return {"positive_gap": sums["gap"] / sums["queries"] if sums.get("queries") else None}


def _rows_file(folder: Path, count: int = 12) -> Path:
    path = folder / "train.jsonl"
    with open(path, "w") as fh:
        for i in range(count):
            record = {
                "query": f"question {i} about topic {i % 4}",
                "pos": [f"answer {i} on topic {i % 4}"],
                "neg": [f"unrelated text {i} {j}" for j in range(3)],
            }
            fh.write(json.dumps(record) + "\n")
    return path


def _config(model: Path, tmp_path: Path, name: str, **options: object) -> TrainConfig:
    return TrainConfig(
        model=str(model),
        train_data=[str(_rows_file(tmp_path))],
        output_dir=str(tmp_path / name),
        train_group_size=3,
        batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_steps=0,
        seed=5,
        cache_dir=str(tmp_path / "cache"),
        **options,
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_a_new_objective_trains_combined_with_infonce(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path, "combined", temperature=0.05)
    objective = WeightedSum([(1.0, InfoNCE(0.05)), (0.5, Alignment())])
    with single_thread():  # through the documented API, as a notebook would
        result = api.train(config, show_progress=False, objective=objective)
    records = [r for r in _log(result.output_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        # InfoNCE's signals as before, the toy's under its prefix.
        assert record["chance_loss"] == pytest.approx(math.log(record["candidates_per_query"]))
        assert 0 <= record["alignment_positive_gap"] <= 2


def test_the_combined_loss_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    passages = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    layout = GroupLayout(
        positive_index=torch.tensor([0, 3]),
        passage_owner=torch.tensor([0, 0, 0, 1, 1, 1]),
        false_negative_mask=torch.zeros(2, 6, dtype=torch.bool),
        passage_ids=torch.arange(6),
        positive_ids=[np.array([0]), np.array([3])],
    )
    reps = {"queries": queries, "passages": passages}
    infonce, alignment = InfoNCE(0.05)(reps, layout), Alignment()(reps, layout)
    combined = WeightedSum([(1.0, InfoNCE(0.05)), (0.5, Alignment())])(reps, layout)
    assert combined.loss.item() == pytest.approx(infonce.loss.item() + 0.5 * alignment.loss.item())
    assert set(combined.terms) == {"infonce", "alignment"}
    sums = combined.signal_sums()
    assert sums["queries"] == 2 and sums["alignment_queries"] == 2


def test_the_cached_strategy_needs_no_change_for_a_new_objective(tiny_model: Path) -> None:
    """GradCache caches representations, not losses: any objective gets the plain gradient."""
    rng = np.random.default_rng(1)
    rows = [TrainRow(query=b, pos=np.array([3 * b]), neg=np.array([3 * b + 1])) for b in range(4)]
    groups = [Group(row=b, query=b, passages=[3 * b, 3 * b + 1, 3 * b + 2]) for b in range(4)]
    queries = TokenTable.from_lists([rng.integers(1000, 2000, size=5) for _ in range(4)])
    passages = TokenTable.from_lists(
        [rng.integers(1000, 2000, size=rng.integers(4, 12)) for _ in range(12)]
    )
    batch = collate(groups, rows, queries, passages, 0)
    grads = []
    with single_thread():
        encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
        encoder.eval()  # no dropout: the two strategies then see the same network
        for chunk in (0, 3):
            forward_backward(
                encoder,
                batch,
                Alignment(),
                StepSettings(cache_chunk_size=chunk),
                lambda loss: loss.backward(),
                lambda loss: True,
            )
            grads.append(
                torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
            )
            encoder.zero_grad(set_to_none=True)
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5


class LeftPaddedBiEncoder(BiEncoder):
    """Toy model kind: a bi-encoder whose batches are padded on the left (decoder style)."""

    name = "left-padded-bi-encoder"
    seen_sides: list[str] = []

    def padding_side(self, encoder: Encoder) -> str:
        return "left"

    def batch(self, encoder, groups, texts, pad_multiple):  # noqa: ANN001, ANN201
        batch = super().batch(encoder, groups, texts, pad_multiple)
        self.seen_sides.extend(part.padding_side for part in batch.parts.values())
        return batch


def test_a_registered_model_kind_is_trained_by_name(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODEL_KINDS, LeftPaddedBiEncoder.name, LeftPaddedBiEncoder)
    LeftPaddedBiEncoder.seen_sides.clear()
    config = _config(tiny_model, tmp_path, "left", pooling="last_token", cache_chunk_size=2)
    with single_thread():
        result = train(config, show_progress=False, kind_name=LeftPaddedBiEncoder.name)
    assert result.steps == 3
    assert set(LeftPaddedBiEncoder.seen_sides) == {"left"}
    assert all(math.isfinite(r["loss"]) for r in _log(result.output_dir) if "loss" in r)


def test_an_unknown_model_kind_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from embtune.errors import UsageError
    from embtune.kinds import model_kind

    with pytest.raises(ValueError, match="unknown model kind 'reranker'"):
        model_kind("reranker")
    config = _config(tiny_model, tmp_path, "never")
    with pytest.raises(UsageError, match="unknown model kind 'reranker'; known: bi-encoder"):
        api.train(config, kind_name="reranker")
    assert not (tmp_path / "never").exists()


def test_no_function_in_the_package_is_over_120_lines() -> None:
    long = []
    for path in sorted((ROOT / "src" / "embtune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 120:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_the_bi_encoder_pads_training_batches_on_the_tokenizers_side(tiny_model: Path) -> None:
    """Training pads as evaluation does (Encoder.pad uses the tokenizer), on either side."""
    from embtune.data.groups import TrainingTexts
    from embtune.data.store import TextStore
    from embtune.kinds.bi_encoder import BiEncoderTexts

    encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
    rows = [TrainRow(query=0, pos=np.array([0]), neg=np.array([1]))]
    texts = BiEncoderTexts(
        TrainingTexts(TextStore(["q"]), TextStore(["p", "n"]), rows),
        TokenTable.from_lists([[101, 7, 102]]),
        TokenTable.from_lists([[101, 102], [101, 8, 9, 102]]),
    )
    group = [Group(row=0, query=0, passages=[0, 1])]
    for side in ("right", "left"):
        encoder.tokenizer.padding_side = side
        batch = BiEncoder().batch(encoder, group, texts, pad_multiple=1)
        passages = batch.parts["passages"]
        assert passages.padding_side == side
        short = passages.attention_mask[0].tolist()
        assert short == ([1, 1, 0, 0] if side == "right" else [0, 0, 1, 1])
        evaluated = encoder.pad([[101, 102], [101, 8, 9, 102]])["attention_mask"][0].tolist()
        assert evaluated == short
