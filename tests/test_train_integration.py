"""End-to-end training: real model on real example data, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from embtune.cli import main
from embtune.config import TrainConfig
from embtune.data.formats import load_training_data
from embtune.data.groups import GroupSampler, build_rows
from embtune.data.store import tokenize_store
from embtune.kinds.bi_encoder import collate
from embtune.models.encoder import Encoder
from embtune.objectives.infonce import contrastive_loss
from embtune.training.run import LOG_FILE, pad_multiple_for, train
from tests.conftest import NQ_FILE, assert_modes_follow, umask


def _fixed_batch_loss(model_path: Path, temperature: float) -> float:
    """Loss of one fixed batch (all nq rows, epoch-0 groups of 4) under a model."""
    enc = Encoder.from_pretrained(model_path)
    data = load_training_data([NQ_FILE])
    texts = build_rows(data.records)
    q_tok, _ = tokenize_store(texts.queries, enc.tokenizer, 64, None, show_progress=False)
    p_tok, _ = tokenize_store(texts.passages, enc.tokenizer, 256, None, show_progress=False)
    sampler = GroupSampler(texts.rows, 4, "corpus", len(texts.passages), seed=123)
    groups = [sampler.group(i, epoch=0) for i in range(len(texts.rows))]
    batch = collate(groups, texts.rows, q_tok, p_tok, enc.tokenizer.pad_token_id)
    enc.eval()
    with torch.no_grad():
        q = enc(batch.parts["queries"].input_ids, batch.parts["queries"].attention_mask)
        p = enc(batch.parts["passages"].input_ids, batch.parts["passages"].attention_mask)
        out = contrastive_loss(
            q,
            p,
            batch.layout.positive_index,
            batch.layout.passage_owner,
            temperature,
            True,
            batch.layout.false_negative_mask,
        )
    return out.loss.item()


@pytest.fixture(scope="module")
def trained_minilm(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 after 5 steps on FlagEmbedding's nq example file."""
    out = tmp_path_factory.mktemp("minilm-nq")
    config = TrainConfig(
        model=str(minilm),
        train_data=[str(NQ_FILE)],
        output_dir=str(out),
        overwrite_output_dir=True,
        train_group_size=4,
        batch_size=10,
        max_steps=5,
        learning_rate=5e-5,
        warmup_ratio=0.0,
        temperature=0.05,
        logging_steps=1,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    result = train(config, show_progress=False)
    assert result.steps == 5
    return out


def test_five_steps_lower_the_loss_on_the_batch(minilm: Path, trained_minilm: Path) -> None:
    before = _fixed_batch_loss(minilm, 0.05)
    after = _fixed_batch_loss(trained_minilm, 0.05)
    assert after < before * 0.9, (before, after)


def test_run_folder_has_model_logs_and_config(trained_minilm: Path) -> None:
    rows = [json.loads(line) for line in (trained_minilm / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # 10 queries x 4 passages, every passage a candidate except masked false negatives.
    assert all(0 < r["candidates_per_query"] <= 40 for r in rows)
    assert all(r["texts_per_second"] > 0 for r in rows)
    assert list((trained_minilm / "tensorboard").rglob("events.out.tfevents*"))
    saved = yaml.safe_load((trained_minilm / "train_config.yaml").read_text())
    assert saved["train_group_size"] == 4
    budget = json.loads((trained_minilm / "negatives_budget.json").read_text())
    assert budget["negatives_used_per_step"] == 3


def test_saved_model_loads_in_sentence_transformers_with_equal_embeddings(
    trained_minilm: Path,
) -> None:
    from sentence_transformers import SentenceTransformer

    enc = Encoder.from_pretrained(trained_minilm)
    assert enc.settings.pooling == "mean" and enc.settings.normalize
    texts = ["how many episodes does big little lies have", "the second season aired in 2019"]
    ours = enc.encode_passages(texts)
    st = SentenceTransformer(str(trained_minilm), device="cpu")
    theirs = st.encode(texts, convert_to_tensor=True, prompt_name="document").cpu()
    assert (ours - theirs).abs().max().item() < 1e-5


def test_broken_file_exits_2_with_file_and_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2", "pos": ["p"]\n')
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_model), "--train-data", str(bad), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2:" in err and "malformed JSON" in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written when the input is bad"


def _tiny_beir(folder: Path) -> Path:
    folder.mkdir()
    docs = [f"document number {i} about topic {i % 5}" for i in range(30)]
    with open(folder / "corpus.jsonl", "w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"_id": f"d{i}", "title": f"title {i}", "text": d}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for i in range(12):
            fh.write(
                json.dumps({"_id": f"q{i}", "text": f"which document is about topic {i % 5}"})
                + "\n"
            )
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "train.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for i in range(12):
            fh.write(f"q{i}\td{i}\t1\n")
    return folder


def _cli_train(tiny_model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train", "--model", str(tiny_model), "--train-data", str(data), "-o", str(out),
            "--batch-size", "4", "--train-group-size", "3", "--max-steps", "3",
            "--logging-steps", "1", "--cache-dir", str(out.parent / "cache"), *extra,
        ]
    )  # fmt: skip


def test_cli_trains_on_beir_layout_with_corpus_fill(tiny_model: Path, tmp_path: Path) -> None:
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    with umask(0o027):  # a folder shared with a group: every file group-readable, no more
        assert _cli_train(tiny_model, data, out, "--save-steps", "2") == 0
    budget = json.loads((out / "negatives_budget.json").read_text())
    assert budget["rows"] == 12 and budget["rows_needing_fill"] == 12
    assert (out / "model.safetensors").is_file() and (out / "modules.json").is_file()
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert_modes_follow(out, 0o640, 0o750)


def test_same_seed_gives_the_same_loss_sequence(tiny_model: Path, tmp_path: Path) -> None:
    data = _tiny_beir(tmp_path / "beir")
    losses = []
    for name in ("a", "b"):
        assert _cli_train(tiny_model, data, tmp_path / name, "--seed", "7") == 0
        rows = (tmp_path / name / LOG_FILE).read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows])
    assert losses[0] == losses[1]
    assert len(losses[0]) == 3


def test_log_reports_padded_widths_rounded_to_the_multiple(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    assert _cli_train(tiny_model, data, out, "--pad-to-multiple-of", "8") == 0
    records = [json.loads(r) for r in (out / LOG_FILE).read_text().splitlines()]
    widths = [(r["query_width"], r["passage_width"]) for r in records]
    assert len(widths) == 3
    assert all(q % 8 == 0 and p % 8 == 0 and 0 < q <= 64 and 0 < p <= 256 for q, p in widths)
    assert all(r["padding_share"] > 0 for r in records)


def test_batch_widths_round_to_16_by_default_on_a_gpu_only() -> None:
    assert pad_multiple_for(0, torch.device("cpu")) == 1
    assert pad_multiple_for(0, torch.device("cuda")) == 16
    assert pad_multiple_for(8, torch.device("cuda")) == 8
    assert pad_multiple_for(8, torch.device("cpu")) == 8


def test_yaml_config_supplies_options_and_flags_override(tiny_model: Path, tmp_path: Path) -> None:
    data = _tiny_beir(tmp_path / "beir")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train_group_size: 2\ntemperature: 0.1\nmodel_name_or_path: {tiny_model}\n")
    out = tmp_path / "run"
    assert _cli_train(tiny_model, data, out, "--config", str(cfg), "--temperature", "0.3") == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["temperature"] == 0.3  # flag beats YAML
    assert saved["train_group_size"] == 3  # _cli_train passes --train-group-size 3


def test_non_empty_output_dir_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    assert _cli_train(tiny_model, data, out) == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err


def test_dev_evaluation_keeps_the_best_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    from embtune.data.dev_split import dev_dataset
    from embtune.eval.retrieval import evaluate_retrieval

    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    extra = (
        "--dev-fraction",
        "0.25",
        "--eval-steps",
        "1",
        "--save-best",
        "--learning-rate",
        "1e-3",
    )
    assert _cli_train(tiny_model, data, out, *extra) == 0
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    dev = [(r["step"], r["dev_ndcg@10"]) for r in rows if "dev_ndcg@10" in r]
    assert [step for step, _ in dev] == [1, 2, 3]
    best_step, best_ndcg = max(dev, key=lambda item: item[1])  # first maximum wins ties

    held_out = json.loads((out / "dev_split.json").read_text())["rows"]
    assert len(held_out) == 3  # 25% of 12 queries, saved with the run
    records = load_training_data([data]).records
    dev_rows = [r for r in records if r.query_id in {row["query_id"] for row in held_out}]
    dev_set = dev_dataset(dev_rows, load_training_data([data]).corpus)
    best = Encoder.from_pretrained(out / "best")
    again = evaluate_retrieval(best, dev_set, show_progress=False)["ndcg@10"]
    assert again == pytest.approx(best_ndcg, abs=1e-6), (best_step, dev)
