"""The cross-encoder model kind: pairs, reranker objectives, training, saving, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from embtune.checkpoint import KILL_AT_STEP_ENV
from embtune.cli import main
from embtune.config import TrainConfig
from embtune.data.batching import group_layout
from embtune.data.groups import Group, TrainRow
from embtune.models.cross_encoder import (
    RERANKER_FILE,
    CrossEncoder,
    PairTemplate,
    saved_reranker_settings,
)
from embtune.objectives.reranking import ListwiseCrossEntropy, PointwiseBCE, reranker_objective
from tests.conftest import minilm_path, single_thread
from tests.test_resume import log_rows, max_weight_difference, run_until_killed
from tests.test_train_integration import _tiny_beir


def _groups(sizes: list[int]) -> tuple[list[Group], list[TrainRow]]:
    """Groups of the given sizes over distinct passages, the positive first."""
    groups, rows, next_id = [], [], 0
    for row, size in enumerate(sizes):
        passages = list(range(next_id, next_id + size))
        next_id += size
        rows.append(TrainRow(query=row, pos=[passages[0]], neg=passages[1:], source=("t", row)))
        groups.append(Group(row=row, query=row, passages=passages))
    return groups, rows


def test_pairs_built_from_token_tables_equal_the_tokenizers_pair_encoding() -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    template = PairTemplate.of(tokenizer)
    query, passage = "what is a cell", "A cell is the basic unit of life, as biology says."
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    p = tokenizer(passage, add_special_tokens=False)["input_ids"]
    for max_len in (10, 16, 512):
        ids, types = template.join(q, p, max_len)
        expected = tokenizer(
            query, passage, truncation="only_second", max_length=max_len,
            return_token_type_ids=True,
        )  # fmt: skip
        assert ids == expected["input_ids"]
        assert types == expected["token_type_ids"]
        assert len(ids) <= max_len


def test_listwise_loss_is_cross_entropy_over_each_group_with_its_signals() -> None:
    groups, rows = _groups([3, 2])
    layout = group_layout(groups, rows)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])  # query 0 ranks its positive first
    out = ListwiseCrossEntropy()({"pairs": logits}, layout)
    expected = (-F.log_softmax(logits[:3], 0)[0] - F.log_softmax(logits[3:], 0)[0]) / 2
    assert out.loss.item() == pytest.approx(expected.item())
    sums = out.signal_sums()
    record = ListwiseCrossEntropy().window_record(sums, out.loss.item())
    assert record["accuracy"] == 0.5
    assert record["score_margin"] == pytest.approx(((2.0 - 0.5) + (0.0 - 1.0)) / 2)
    assert record["positive_score"] == pytest.approx(1.0)
    assert record["negative_score"] == pytest.approx((0.5 - 1.0 + 1.0) / 3)
    assert record["candidates_per_query"] == pytest.approx(2.5)
    assert record["chance_loss"] == pytest.approx(math.log(2.5))


def test_pointwise_loss_is_binary_cross_entropy_with_the_positive_labelled_one() -> None:
    groups, rows = _groups([3, 3])
    layout = group_layout(groups, rows)
    logits = torch.tensor([1.0, -1.0, 0.5, -0.2, 0.3, -2.0])
    labels = torch.tensor([1.0, 0, 0, 1, 0, 0])
    out = PointwiseBCE()({"pairs": logits}, layout)
    assert out.loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, labels).item()
    )
    record = PointwiseBCE().window_record(out.signal_sums(), out.loss.item())
    share = 1 / 3
    assert record["chance_loss"] == pytest.approx(
        -(share * math.log(share) + (1 - share) * math.log(1 - share))
    )
    assert record["accuracy"] == 0.5  # query 1's negative 0.3 beats its positive -0.2


def test_kl_distillation_on_pair_logits_adds_the_soft_term_to_the_listwise_loss() -> None:
    groups, rows = _groups([3])
    teacher = torch.tensor([3.0, 1.0, 0.0])
    for g, t in zip(groups, [teacher], strict=True):
        g.scores = t.tolist()
    layout = group_layout(groups, rows)
    logits = torch.tensor([0.2, 0.4, -0.1])
    config = TrainConfig(knowledge_distillation=True, reranker_loss="listwise")
    out = reranker_objective(config)({"pairs": logits}, layout)
    hard = -F.log_softmax(logits, 0)[0]
    soft = -(F.softmax(teacher, 0) * F.log_softmax(logits, 0)).sum()
    assert out.loss.item() == pytest.approx((hard + soft).item(), rel=1e-6)
    assert set(out.terms) == {"listwise", "kl_div"}


def _exit_code(argv: list[str]) -> int:
    """The command's exit status, whether argparse exits or the command returns."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model-kind", "cross-encoder", "--model", str(model), "--train-data",
        str(data), "-o", str(out), "--batch-size", "4", "--train-group-size", "3",
        "--max-steps", "6", "--logging-steps", "1", "--save-steps", "2",
        "--learning-rate", "1e-3", "--seed", "5", "--query-max-len", "16",
        "--passage-max-len", "24", "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_beir(tmp_path_factory.mktemp("ce-data") / "beir")


@pytest.fixture(scope="module")
def trained(
    tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """A reranker trained from the tiny BERT (a new head), with dev evaluation; its output."""
    out = tmp_path_factory.mktemp("ce-run") / "run"
    argv = _train_argv(
        tiny_model, data, out, "--eval-data", str(data), "--eval-split", "train",
        "--eval-steps", "3", "--rerank-top-k", "5", "--save-best",
    )  # fmt: skip
    import contextlib
    import io

    printed = io.StringIO()
    with single_thread(), contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


def test_a_reranker_trains_from_an_encoder_with_a_new_head_said_so(
    trained: tuple[Path, str],
) -> None:
    out, printed = trained
    assert "a new one-label head is added" in printed
    assert "candidates each query is scored against: 3" in printed
    assert "dev candidates: top 5 of" in printed
    rows = log_rows(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["chance_loss"] == pytest.approx(math.log(3)) for r in steps)
    assert all(0 <= r["accuracy"] <= 1 and "score_margin" in r for r in steps)
    dev = [r for r in rows if "dev_ndcg@10" in r]
    assert [r["step"] for r in dev] == [3, 6]
    assert (out / "best" / RERANKER_FILE).is_file()
    # The model card: a reranker's, with the dev metrics the log holds, and best/'s own.
    card = json.loads((out / "train_summary.json").read_text())["model_card"]
    assert card["front_matter"]["pipeline_tag"] == "text-ranking"
    assert [(e["step"], e["metrics"]["ndcg@10"]) for e in card["dev"]] == [
        (r["step"], r["dev_ndcg@10"]) for r in dev
    ]
    text = (out / "README.md").read_text()
    assert "CrossEncoder(" in text and "FlagReranker(" in text and "max_length=40" in text
    best = (out / "best" / "README.md").read_text()
    assert "These weights were chosen by the best dev nDCG@10" in best


def test_the_saved_reranker_loads_in_sentence_transformers_and_transformers_with_our_scores(
    trained: tuple[Path, str],
) -> None:
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from embtune.scoring.teachers import CrossEncoderTeacher, TeacherSettings

    out, _ = trained
    settings = json.loads((out / RERANKER_FILE).read_text())
    assert settings["max_len"] == 40
    pairs = [
        ("which document is about topic 1", "document number 6 about topic 1"),
        ("which document is about topic 2", "title 7 document number 7 about topic 2"),
    ]
    teacher = CrossEncoderTeacher.from_pretrained(str(out), TeacherSettings(max_length=40))
    ours = teacher.score_pairs([q for q, _ in pairs], [p for _, p in pairs])
    st = STCrossEncoder(str(out)).predict(pairs, convert_to_numpy=True).tolist()
    assert st == pytest.approx(ours, abs=1e-5)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        inputs = tokenizer([q for q, _ in pairs], [p for _, p in pairs], padding=True,
                           return_tensors="pt")  # fmt: skip
        logits = hf(**inputs).logits[:, 0].tolist()
    assert logits == pytest.approx(ours, abs=1e-5)
    # Continuing from the saved reranker keeps its head.
    assert not CrossEncoder.from_pretrained(str(out), saved_reranker_settings(out)).head_added


def test_a_killed_reranker_run_resumes_to_the_same_weights_and_log(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    with single_thread():
        assert main(_train_argv(tiny_model, data, reference)) == 0
    out = tmp_path / "resumed"
    run_until_killed(_train_argv(tiny_model, data, out), KILL_AT_STEP_ENV, 3)
    with single_thread():
        assert main(_train_argv(tiny_model, data, out, "--resume")) == 0
    ref = [(r["step"], r["loss"]) for r in log_rows(reference) if "loss" in r]
    got = [(r["step"], r["loss"]) for r in log_rows(out) if "loss" in r]
    assert [s for s, _ in got] == [s for s, _ in ref]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-6)
    assert max_weight_difference(out, reference) <= 1e-6


def test_chunked_pairs_give_the_plain_steps_gradient(tiny_model: Path, data: Path) -> None:
    from embtune.data.formats import load_training_data
    from embtune.data.groups import GroupSampler
    from embtune.kinds.cross_encoder import CrossEncoderKind
    from embtune.training.step import StepSettings, forward_backward

    config = TrainConfig(
        model_kind="cross-encoder", model=str(tiny_model), train_data=[str(data)],
        output_dir="unused", train_group_size=3, query_max_len=16, passage_max_len=24,
    )  # fmt: skip
    kind = CrossEncoderKind()
    model = kind.load(config)
    model.eval()  # no dropout: chunks draw their masks per chunk, the plain step per batch
    texts = kind.prepare_texts(model, load_training_data([str(data)]), config, False)
    sampler = GroupSampler(kind.rows(texts), 3, "corpus", kind.passage_count(texts), seed=1)
    batch = kind.batch(model, [sampler.group(i, 0) for i in range(4)], texts, 1)
    assert batch.parts["pairs"].token_type_ids is not None

    def gradient(chunk: int) -> list[torch.Tensor]:
        model.zero_grad()
        forward_backward(
            model, batch, kind.objective(config), StepSettings(cache_chunk_size=chunk),
            lambda loss: loss.backward(), lambda loss: True,
        )  # fmt: skip
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, chunked = gradient(0), gradient(5)
    assert len(plain) == len(chunked) > 0
    for a, b in zip(plain, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pooling", "mean"], "--pooling: a bi-encoder option"),
        (["--query-instruction", "q: "], "--query-instruction: a bi-encoder option"),
        (["--train-group-size", "1"], "the listwise loss is always 0"),
        (["--max-len", "4000"], "--max-len: a pair of 4000 tokens is beyond"),
        (["--model-kind", "triple-encoder"], "invalid choice"),
    ],
)
def test_options_a_reranker_cannot_take_are_refused_in_one_line(
    tiny_model: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "run"
    assert _exit_code(_train_argv(tiny_model, data, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_a_reranker_as_model_needs_a_dev_retriever(
    trained: tuple[Path, str], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reranker, _ = trained
    argv = _train_argv(reranker, data, tmp_path / "run", "--eval-data", str(data),
                       "--eval-split", "train")  # fmt: skip
    assert _exit_code(argv) == 2
    assert (
        "--dev-retriever: dev evaluation reranks a retriever's top 100" in capsys.readouterr().err
    )


def test_inspect_gives_a_rerankers_budget_without_in_batch_negatives(data: Path) -> None:
    from embtune import api

    result = api.inspect(data, model_kind="cross-encoder", train_group_size=3, batch_size=4)
    assert result.budget.in_batch_negatives is False
    assert "candidates each query is scored against: 3" in result.text
    assert "--model-kind cross-encoder" in result.text
    bi = api.inspect(data, train_group_size=3, batch_size=4)
    assert "candidates each query is scored against: 12" in bi.text


def test_a_saved_reranker_scores_with_its_own_pair_length_and_instructions(
    trained: tuple[Path, str],
) -> None:
    from embtune.scoring.teachers import TeacherSettings, load_teacher

    out, _ = trained
    teacher = load_teacher(str(out), "cross-encoder", TeacherSettings())
    assert teacher.identity()["max_length"] == 40
    given = load_teacher(str(out), "cross-encoder", TeacherSettings(max_length=64))
    assert given.identity()["max_length"] == 64


def test_torchrun_trains_a_reranker_on_two_processes(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import subprocess_env
    from tests.test_train_step import _free_port, write_topic_rows

    data = write_topic_rows(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "embtune", "train", "--model-kind",
        "cross-encoder", "--model", str(tiny_model), "--train-data", str(data),
        "--output-dir", str(out), "--batch-size", "2", "--train-group-size", "4",
        "--max-steps", "2", "--logging-steps", "1", "--save-steps", "0",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # Nothing is gathered: each query is scored against its own group of 4 only.
    assert all(r["candidates_per_query"] == 4 for r in steps)
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    assert (out / RERANKER_FILE).is_file()
