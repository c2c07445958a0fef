"""End-to-end training: real model on real example data, and the CLI around it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

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
from embtune.training.run import LOG_FILE, TrainResult, pad_multiple_for, train
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


@dataclass
class MinilmRun:
    """The module's one real training run, and what its --push-to-hub sent to the (fake) Hub."""

    out: Path
    result: TrainResult
    hub_calls: list[tuple[str, dict]]


def fake_hub(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, dict]]) -> None:
    """An online Hugging Face Hub with a token, whose HfApi records each call instead of
    sending it (the upload also records the files its patterns select)."""
    import huggingface_hub
    from huggingface_hub import HfApi, RepoUrl

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")

    def whoami(self: HfApi, token: object = None, **kwargs: object) -> dict:
        calls.append(("whoami", {"token": self.token}))
        return {"name": "someone"}

    def create_repo(self: HfApi, repo_id: str, **kwargs: object) -> RepoUrl:
        calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: HfApi, **kwargs: object) -> SimpleNamespace:
        folder, patterns = Path(str(kwargs["folder_path"])), list(kwargs["allow_patterns"])
        sent = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and any(fnmatch(p.relative_to(folder).as_posix(), x) for x in patterns)
        )
        calls.append(("upload_folder", {**kwargs, "sent": sent}))
        return SimpleNamespace(commit_url="https://huggingface.co/someone/minilm-nq/commit/abc")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture(scope="module")
def minilm_run(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> MinilmRun:
    """all-MiniLM-L6-v2 after 5 steps on FlagEmbedding's nq example file, pushed to a fake Hub
    as minilm-nq (under the token's account), under umask 0o022."""
    out = tmp_path_factory.mktemp("minilm") / "run"  # made by the run: its mode is the run's
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
        push_to_hub=True,
        hub_model_id="minilm-nq",
    )
    calls: list[tuple[str, dict]] = []
    with pytest.MonkeyPatch.context() as monkeypatch, umask(0o022):
        fake_hub(monkeypatch, calls)
        result = train(config, show_progress=False)
    assert result.steps == 5
    return MinilmRun(out, result, calls)


@pytest.fixture(scope="module")
def trained_minilm(minilm_run: MinilmRun) -> Path:
    return minilm_run.out


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


def test_the_model_card_describes_the_run_with_its_own_numbers(minilm_run: MinilmRun) -> None:
    from huggingface_hub import ModelCard

    out = minilm_run.out
    card = ModelCard((out / "README.md").read_text())
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    summary = json.loads((out / "train_summary.json").read_text())
    facts = summary["model_card"]
    assert facts["front_matter"] == card.data.to_dict()
    assert facts["model_id"] == "someone/minilm-nq"  # the pushed repository
    assert facts["settings"]["pooling"] == "mean"
    assert "FlagModel(" in card.text and "pooling_method='mean'" in card.text
    budget = json.loads((out / "negatives_budget.json").read_text())
    assert facts["budget"] == budget and facts["data"]["rows"] == budget["rows"]
    assert facts["step"] == summary["steps"] == 5
    assert facts["training"]["train_seconds"] == summary["train_seconds"]
    assert f"{summary['texts_per_second']:.1f} texts/s" in card.text
    assert facts["dev"] == [] and "Not evaluated: the run had no dev set." in card.text


def test_the_cards_transformers_example_embeds_as_the_model(trained_minilm: Path) -> None:
    text = (trained_minilm / "README.md").read_text()
    example = re.findall(r"### transformers\n\n```python\n(.*?)```", text, flags=re.S)[0]
    scope: dict = {}
    exec(example.replace(repr("someone/minilm-nq"), repr(str(trained_minilm))), scope)
    ours = Encoder.from_pretrained(trained_minilm).encode_queries(
        ["how many people live in Berlin?"]
    )
    assert (scope["queries"] - ours).abs().max().item() < 1e-5


def test_push_to_hub_uploads_the_model_and_its_card_but_no_checkpoints_or_logs(
    minilm_run: MinilmRun,
) -> None:
    out, calls = minilm_run.out, minilm_run.hub_calls
    assert [name for name, _ in calls] == ["whoami", "create_repo", "upload_folder"]
    create, upload = calls[1][1], calls[2][1]
    assert create["repo_id"] == "someone/minilm-nq" and create["exist_ok"] is True
    assert create["token"] == "hf_fake_token" and create["private"] is None
    assert upload["repo_id"] == "someone/minilm-nq"
    assert Path(upload["folder_path"]) == out
    sent = set(upload["sent"])
    expected = {"README.md", "model.safetensors", "modules.json", "1_Pooling/config.json"}
    expected |= {"tokenizer.json", "train_summary.json", "train_config.yaml"}
    assert expected <= sent
    assert not sent & {"train_log.jsonl", "trainer_state.json", ".embtune.lock"}
    assert not any(name.startswith("tensorboard/") for name in sent)
    assert minilm_run.result.hub_url == "https://huggingface.co/someone/minilm-nq/commit/abc"
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["hub_model_id"] == "someone/minilm-nq" and saved["hub_token"] is None


def test_the_run_folder_follows_the_umask(trained_minilm: Path) -> None:
    assert_modes_follow(trained_minilm, 0o644, 0o755)  # the run was made under umask 0o022


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


def test_push_to_hub_is_refused_before_any_work_when_offline_or_without_a_token(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model), "--train-data", str(NQ_FILE), "-o", str(out)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*args, "--push-to-hub"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub: Hugging Face's offline mode is on (HF_HUB_OFFLINE)" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main([*args, "--push-to-hub"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub: no Hugging Face token" in err and "Traceback" not in err
    assert not out.exists(), "nothing may be written when the push cannot happen"


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
    for name, report_to in (("a", "tensorboard"), ("b", "none")):
        extra = ("--seed", "7", "--report-to", report_to)
        assert _cli_train(tiny_model, data, tmp_path / name, *extra) == 0
        rows = (tmp_path / name / LOG_FILE).read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows])
    assert losses[0] == losses[1]
    assert len(losses[0]) == 3
    # --report-to none: the log is train_log.jsonl only; TensorBoard as before otherwise.
    assert list((tmp_path / "a" / "tensorboard").rglob("events.out.tfevents*"))
    assert not (tmp_path / "b" / "tensorboard").exists()


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
