"""Matryoshka dimensions: the objective against a hand computation, the cached strategy, a
training run logging every dimension, `embtune eval --dims`, and ``truncate_dim`` matching
sentence-transformers on a saved model (docs/matryoshka.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embtune.cli import main
from embtune.data.batching import GroupLayout
from embtune.data.dev_split import dev_dataset
from embtune.data.formats import load_beir, load_training_data
from embtune.data.groups import Group, TrainRow
from embtune.data.store import TokenTable
from embtune.errors import UsageError
from embtune.eval.retrieval import evaluate_retrieval
from embtune.kinds.bi_encoder import collate
from embtune.models.encoder import Encoder, saved_settings, truncate_embeddings
from embtune.objectives import InfoNCE, Matryoshka, ObjectiveOutput, WeightedSum
from embtune.objectives.base import term_values
from embtune.objectives.infonce import contrastive_loss
from embtune.report import plot_dimensions
from embtune.run_files import DIMENSIONS_PLOT, LOG_FILE
from embtune.training.step import StepSettings, forward_backward
from tests.conftest import single_thread
from tests.test_eval_cli import write_beir

DIMS = [32, 16, 8]  # the tiny model is 32 wide


def _layout() -> GroupLayout:
    return GroupLayout(
        positive_index=torch.tensor([0, 3]),
        passage_owner=torch.tensor([0, 0, 0, 1, 1, 1]),
        false_negative_mask=torch.zeros(2, 6, dtype=torch.bool),
        passage_ids=torch.arange(6),
        positive_ids=[np.array([0]), np.array([3])],
    )


def _representations() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "queries": F.normalize(torch.randn(2, 8), dim=-1),
        "passages": F.normalize(torch.randn(6, 8), dim=-1),
    }


def test_the_loss_is_the_weighted_sum_of_infonce_at_each_truncated_renormalized_dim() -> None:
    reps, layout = _representations(), _layout()
    dims, weights = [8, 4, 2], [1.0, 0.5, 0.25]
    out = Matryoshka(InfoNCE(0.05), dims, weights, normalize=True)(reps, layout)
    by_hand = []
    for d in dims:
        q = reps["queries"][:, :d] / reps["queries"][:, :d].norm(dim=-1, keepdim=True)
        p = reps["passages"][:, :d] / reps["passages"][:, :d].norm(dim=-1, keepdim=True)
        scores = q @ p.T / 0.05
        by_hand.append(-torch.log_softmax(scores, dim=1)[[0, 1], [0, 3]].mean().item())
    weighted = sum(w * v for w, v in zip(weights, by_hand, strict=True))
    assert out.loss.item() == pytest.approx(weighted, 1e-6)
    assert list(out.terms) == ["dim8", "dim4", "dim2"]
    assert [t.item() for t in out.terms.values()] == pytest.approx(by_hand, 1e-6)


def test_without_normalize_the_vectors_are_only_truncated() -> None:
    reps, layout = _representations(), _layout()
    reps = {name: 3 * rep for name, rep in reps.items()}  # not unit length
    out = Matryoshka(InfoNCE(0.05), [4], [1.0], normalize=False)(reps, layout)
    expected = contrastive_loss(
        reps["queries"][:, :4], reps["passages"][:, :4], layout.positive_index,
        layout.passage_owner, 0.05,
    ).loss  # fmt: skip
    assert out.loss.item() == pytest.approx(expected.item(), 1e-6)


def test_signals_keep_their_names_at_the_largest_dim_and_get_a_prefix_at_the_others() -> None:
    reps, layout = _representations(), _layout()
    objective = Matryoshka(InfoNCE(0.05), [4, 8, 2], [1.0, 1.0, 1.0], normalize=True)
    out = objective(reps, layout)
    record = objective.window_record(out.signal_sums(), out.loss.item())
    assert list(record)[:2] == ["chance_loss", "loss_over_chance"]  # 8, the largest, first
    assert record["chance_loss"] == pytest.approx(math.log(6))
    # Each dimension's record is computed with its own loss, not the weighted total.
    for d, prefix in ((8, ""), (4, "dim4_"), (2, "dim2_")):
        own = out.terms[f"dim{d}"].item()
        assert record[f"{prefix}loss_over_chance"] == pytest.approx(own / math.log(6), 1e-6)
        assert 0 <= record[f"{prefix}accuracy"] <= 1
    assert "dim8_accuracy" not in record
    assert not any(key.startswith("matryoshka_") for key in record)


def test_a_dim_wider_than_the_representations_is_an_error() -> None:
    with pytest.raises(ValueError, match="Matryoshka dimension 16 exceeds the width 8"):
        Matryoshka(InfoNCE(0.05), [16, 4], [1.0, 1.0], True)(_representations(), _layout())


def test_terms_are_logged_only_when_there_are_several() -> None:
    loss = torch.tensor(2.0)
    assert term_values(ObjectiveOutput(loss, {"infonce": loss})) == {}
    both = ObjectiveOutput(loss, {"a": torch.tensor(1.5), "b": torch.tensor(0.5)})
    assert term_values(both) == {"a": 1.5, "b": 0.5}


def _batch():  # noqa: ANN202
    rng = np.random.default_rng(1)
    rows = [TrainRow(query=b, pos=np.array([3 * b]), neg=np.array([3 * b + 1])) for b in range(4)]
    groups = [Group(row=b, query=b, passages=[3 * b, 3 * b + 1, 3 * b + 2]) for b in range(4)]
    queries = TokenTable.from_lists([rng.integers(1000, 2000, size=5) for _ in range(4)])
    passages = TokenTable.from_lists(
        [rng.integers(1000, 2000, size=rng.integers(4, 12)) for _ in range(12)]
    )
    return collate(groups, rows, queries, passages, 0)


@pytest.mark.parametrize(
    "inner",
    [InfoNCE(0.05), WeightedSum([(1.0, InfoNCE(0.05)), (0.5, InfoNCE(0.5, False, "wide"))])],
    ids=["infonce", "weighted-sum"],
)
def test_the_cached_strategy_gives_the_plain_gradient(tiny_model: Path, inner) -> None:  # noqa: ANN001
    objective = Matryoshka(inner, DIMS, [1.0, 0.5, 0.25], normalize=True)
    batch, grads, losses = _batch(), [], []
    with single_thread():
        encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
        encoder.eval()  # no dropout: both strategies see the same network
        for chunk in (0, 3):
            result = forward_backward(
                encoder, batch, objective, StepSettings(cache_chunk_size=chunk),
                lambda loss: loss.backward(), lambda loss: True,
            )  # fmt: skip
            losses.append(result.loss.item())
            grads.append(
                torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
            )
            encoder.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].abs().max().item() > 0
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5


def _objective() -> Matryoshka:
    return Matryoshka(InfoNCE(0.05), DIMS, [1.0, 0.5, 0.25], normalize=True)


def _cross_device_worker(rank: int, world: int, port: int, model: str, out: str) -> None:
    """This process's share of tests/test_train_step.py's union batch, cached, with
    cross-device negatives (its tokens drawn as make_batch draws them)."""
    import torch.distributed as dist

    from tests.test_train_step import gradients, load, make_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        _, rows = make_batch(queries=6)
        rng = np.random.default_rng(0)
        queries = [rng.integers(1000, 2000, size=rng.integers(3, 9)) for _ in range(6)]
        passages = [rng.integers(1000, 2000, size=rng.integers(4, 20)) for _ in range(18)]
        share = np.array_split(np.arange(6), world)[rank]
        groups = [Group(row=b, query=b, passages=list(range(b * 3, b * 3 + 3))) for b in share]
        local = collate(groups, rows, TokenTable.from_lists(queries),
                        TokenTable.from_lists(passages), 0)  # fmt: skip
        settings = StepSettings(cache_chunk_size=2, negatives_cross_device=True,
                                shared_parts=("passages",))  # fmt: skip
        encoder = load(Path(model), dropout=False)
        result = forward_backward(
            encoder, local, _objective(), settings, lambda loss: loss.backward(),
            lambda loss: True, loss_weight=len(share) * world / 6,
        )  # fmt: skip
        grad = gradients(encoder)
        dist.all_reduce(grad)  # what DDP does, then divides by the process count
        loss = torch.tensor([result.loss.item() * len(share) / 6])
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss.item(), "grad": grad / world}, out)
    finally:
        dist.destroy_process_group()


def test_cross_device_negatives_with_the_cache_equal_one_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    """2 processes (gloo), cached, against one process on the union batch, plain."""
    import torch.multiprocessing as mp

    from tests.test_train_step import _free_port, gradients, load, make_batch

    out = tmp_path / "rank0.pt"
    mp.spawn(_cross_device_worker, args=(2, _free_port(), str(tiny_model), str(out)), nprocs=2)
    two = torch.load(out)
    union, _ = make_batch(queries=6)
    with single_thread():
        encoder = load(tiny_model, dropout=False)
        single = forward_backward(
            encoder, union, _objective(), StepSettings(), lambda loss: loss.backward(),
            lambda loss: True,
        )  # fmt: skip
    assert two["loss"] == pytest.approx(single.loss.item(), abs=1e-6)
    grad = gradients(encoder)
    # float32 sums in another order across processes; the largest gradient here is ~17.
    assert (two["grad"] - grad).abs().max().item() < 1e-5 * max(1.0, grad.abs().max().item())


def _beir_training_data(folder: Path) -> Path:
    folder.mkdir()
    with open(folder / "corpus.jsonl", "w") as fh:
        for i in range(30):
            record = {"_id": f"d{i}", "title": f"title {i}", "text": f"document {i} on {i % 5}"}
            fh.write(json.dumps(record) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"which document is on {i % 5}"}) + "\n")
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(12)]
    (folder / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
            "--batch-size", "4", "--train-group-size", "3", "--max-steps", "3",
            "--logging-steps", "1", "--cache-dir", str(out.parent / "cache"), *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training data, run folder) of 3 steps at dims 32 16 8, dev-evaluated after each."""
    root = tmp_path_factory.mktemp("mrl")
    data = _beir_training_data(root / "beir")
    out = root / "run"
    extra = ["--matryoshka-dims", "32", "16", "8", "--matryoshka-weights", "1", "0.5", "0.5"]
    extra += ["--dev-fraction", "0.25", "--eval-steps", "1", "--save-best", "--pooling", "mean"]
    with single_thread():
        assert _train(tiny_model, data, out, *extra) == 0
    return data, out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_a_run_logs_each_dimensions_loss(trained: tuple[Path, Path]) -> None:
    windows = [r for r in _log(trained[1]) if "loss" in r]
    assert [r["step"] for r in windows] == [1, 2, 3]
    for r in windows:
        weighted = r["loss_dim32"] + 0.5 * r["loss_dim16"] + 0.5 * r["loss_dim8"]
        assert r["loss"] == pytest.approx(weighted, 1e-6)
        assert r["chance_loss"] == pytest.approx(math.log(r["candidates_per_query"]))
        assert {"accuracy", "dim16_accuracy", "dim8_loss_over_chance"} <= set(r)


def test_a_run_logs_each_dimensions_dev_metrics(tiny_model: Path, trained) -> None:  # noqa: ANN001
    data, out = trained
    dev = [r for r in _log(out) if "dev_ndcg@10" in r]
    assert [r["step"] for r in dev] == [1, 2, 3]
    assert all(f"dev_{m}_dim{d}" in r for r in dev for m in ("ndcg@10", "mrr@10") for d in DIMS)
    # The full embedding's metric is the one --save-best chooses on.
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["best_dev_ndcg@10"] == max(r["dev_ndcg@10"] for r in dev)
    # The last dev evaluation is the saved model's, at each dimension.
    held_out = {row["query_id"] for row in json.loads((out / "dev_split.json").read_text())["rows"]}
    training = load_training_data([data])
    dev_set = dev_dataset([r for r in training.records if r.query_id in held_out], training.corpus)
    for d in (16, 8):
        encoder = Encoder.from_pretrained(out, truncate_dim=d)
        again = evaluate_retrieval(encoder, dev_set, show_progress=False)
        assert again["ndcg@10"] == pytest.approx(dev[-1][f"dev_ndcg@10_dim{d}"], abs=1e-6)
    assert (out / DIMENSIONS_PLOT).stat().st_size > 0
    assert saved_settings(str(out)).matryoshka_dims == DIMS


def test_a_dim_larger_than_the_model_is_refused_before_any_work(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _beir_training_data(tmp_path / "beir")
    out = tmp_path / "run"
    assert _train(tiny_model, data, out, "--matryoshka-dims", "64", "16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "embtune train: error: --matryoshka-dims: 64 is larger than the model's embedding size (32)"
    ]
    assert not out.exists()


@pytest.fixture
def saved(tiny_model: Path, tmp_path: Path) -> Path:
    encoder = Encoder.from_pretrained(tiny_model, pooling="mean", matryoshka_dims=[16, 8])
    encoder.save(tmp_path / "saved")
    return tmp_path / "saved"


def test_eval_dims_prints_a_row_and_writes_a_block_per_dimension(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beir, result = write_beir(tmp_path / "beir"), tmp_path / "eval.json"
    args = ["eval", "--model", str(saved), "--data", str(beir), "--json", str(result)]
    assert main([*args, "--dims", "32", "16", "8", "--k", "1", "10"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = {row[0]: row[1:] for row in rows if row and row[0].isdigit()}
    assert list(table) == ["32", "16", "8"]
    record = json.loads(result.read_text())
    assert list(record["dims"]) == ["32", "16", "8"] and "ndcg@10" not in record
    assert record["queries"] == 3 and record["settings"]["matryoshka_dims"] == [16, 8]
    data = load_beir(beir, "test")
    for dim, block in record["dims"].items():
        encoder = Encoder.from_pretrained(saved, truncate_dim=int(dim))
        alone = evaluate_retrieval(encoder, data, k_values=(1, 10), show_progress=False)
        assert block == pytest.approx(alone, abs=1e-9)
        assert table[dim][0] == f"{alone['ndcg@1']:.4f}"
    # The full size is the plain evaluation, whose JSON layout is unchanged.
    assert main([*args, "--k", "1", "10"]) == 0
    plain = json.loads(result.read_text())
    assert "dims" not in plain and plain["ndcg@10"] == pytest.approx(
        record["dims"]["32"]["ndcg@10"]
    )


@pytest.mark.parametrize("dims", [["64"], ["16", "16"], ["0"]])
def test_eval_refuses_bad_dims_in_one_line(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], dims: list[str]
) -> None:
    beir = write_beir(tmp_path / "beir")
    assert main(["eval", "--model", str(saved), "--data", str(beir), "--dims", *dims]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dims" in err[0]


def test_truncate_dim_equals_sentence_transformers_truncate_dim(saved: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["what is a cell?", "A cell is the basic unit of life.", "Short."]
    full = Encoder.from_pretrained(saved)
    assert full.settings.matryoshka_dims == [16, 8]  # recorded with the model
    for dim in (16, 8):
        ours = Encoder.from_pretrained(saved, truncate_dim=dim).encode_passages(texts)
        st = SentenceTransformer(str(saved), device="cpu", truncate_dim=dim)
        theirs = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()
        assert ours.shape == (3, dim)
        assert (ours - theirs).abs().max().item() < 1e-5
        # Without normalize_embeddings ST only cuts; its cosine similarity equals our dot.
        cut = st.encode(texts, convert_to_tensor=True).cpu()
        assert (st.similarity(cut, cut) - ours @ ours.T).abs().max().item() < 1e-5
        assert (
            truncate_embeddings(full.encode_passages(texts), dim, True) - ours
        ).abs().max() < 1e-6
    # The full-size model is unchanged for sentence-transformers.
    st_full = SentenceTransformer(str(saved), device="cpu")
    theirs = st_full.encode(texts, convert_to_tensor=True).cpu()
    assert (full.encode_passages(texts) - theirs).abs().max().item() < 1e-5


def test_truncate_dim_larger_than_the_model_is_refused(saved: Path) -> None:
    with pytest.raises(UsageError, match="truncate_dim: 33 is larger than the model's"):
        Encoder.from_pretrained(saved, truncate_dim=33)


def test_plot_of_ndcg_against_the_dimension(tmp_path: Path) -> None:
    history = [
        {"step": 1, "loss": 2.0},
        {"step": 1, "dev_ndcg@10": 0.5, "dev_ndcg@10_dim16": 0.4, "dev_ndcg@100_dim16": 0.6},
        {"step": 2, "dev_ndcg@10": 0.6, "dev_ndcg@10_dim16": 0.5, "dev_ndcg@10_dim8": 0.3},
    ]
    assert plot_dimensions(history, tmp_path / "dims.png")
    assert (tmp_path / "dims.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_dimensions(history[:1], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
