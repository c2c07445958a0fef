"""The model card writer (embtune/model_card.py): plain facts in, README.md out, no training."""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest
from huggingface_hub import ModelCard

from embtune.model_card import CardFacts, DataSummary, Evaluation, card_record, card_text

BUDGET_LINES = ["rows (queries): 120", "negatives used per query per step: 7"]


def facts(**changes: object) -> CardFacts:
    """A bi-encoder's facts: mean pooling, a query prompt, two dev evaluations and the base."""
    base = CardFacts(
        kind="bi-encoder",
        model_id="someone/minilm-nq",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        base_model_on_hub=True,
        settings={
            "pooling": "mean",
            "normalize": True,
            "query_instruction": "query: ",
            "passage_instruction": "",
            "query_max_len": 48,
            "passage_max_len": 200,
            "matryoshka_dims": [],
            "append_eos_token": False,
        },
        data=DataSummary(
            train_files=["data/train.jsonl"],
            rows=120,
            passages=950,
            dev_source="`data/dev`, split dev (--eval-data)",
            dev_queries=30,
            dev_passages=400,
        ),
        budget_lines=BUDGET_LINES,
        budget={"rows": 120, "negatives_used_per_step": 7},
        options={"batch_size": 16, "learning_rate": 2e-05, "train_group_size": 8},
        step=40,
        total_steps=40,
        training={"train_seconds": 12.25, "texts_per_second": 480.5},
        dev=[
            Evaluation(0, {"ndcg@10": 0.41236, "mrr@10": 0.38}),
            Evaluation(20, {"ndcg@10": 0.5, "mrr@10": 0.45}),
            Evaluation(40, {"ndcg@10": 0.55125, "mrr@10": 0.47}),
        ],
        best_step=40,
        embtune_version="0.1.0",
    )
    return dataclasses.replace(base, **changes)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def section(text: str, title: str) -> str:
    """The text of one ``## title`` section."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_front_matter_is_a_hub_model_card_for_sentence_transformers() -> None:
    card = ModelCard(card_text(facts()))
    assert card.data.library_name == "sentence-transformers"
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert {"embtune", "sentence-transformers"} <= set(card.data.tags)


def test_a_local_base_model_is_named_in_the_text_but_not_claimed_as_a_hub_repository() -> None:
    card = ModelCard(card_text(facts(base_model="/models/mine", base_model_on_hub=False)))
    assert card.data.base_model is None
    assert "`/models/mine` (a local folder)" in card.text


def test_every_example_is_valid_python_and_uses_the_trained_settings() -> None:
    text = card_text(facts())
    blocks = python_blocks(text)
    assert len(blocks) == 3  # sentence-transformers, transformers, FlagEmbedding
    for code in blocks:
        ast.parse(code)
    st, hf, flag = blocks
    assert "SentenceTransformer('someone/minilm-nq')" in st and 'prompt_name="query"' in st
    assert "mask.sum(1, keepdim=True)" in hf  # mean pooling
    assert "QUERY_PROMPT = 'query: '" in hf and "QUERY_PROMPT, 48)" in hf
    # FlagModel pools the CLS token by default: the card must say what the model uses.
    assert "FlagModel(" in flag and "pooling_method='mean'" in flag
    assert "query_instruction_format='{}{}'" in flag and "max_length=200" in flag


def test_a_decoder_embedder_is_loaded_with_last_token_pooling() -> None:
    settings = {**facts().settings, "pooling": "last_token", "append_eos_token": True}
    settings["query_instruction"] = "Instruct: find the answer\nQuery:"
    text = card_text(facts(settings=settings))
    st, hf, flag = python_blocks(text)
    assert "FlagLLMModel(" in flag and "pooling_method" not in flag
    assert repr("Instruct: find the answer\nQuery:") in flag
    assert "hidden[torch.arange(len(hidden)), last]" in hf
    assert "appended to every text by the saved tokenizer" in text


def test_a_reranker_card_loads_it_as_a_cross_encoder_and_flag_reranker() -> None:
    settings = {
        "query_max_len": 32,
        "passage_max_len": 128,
        "max_len": 160,
        "query_instruction": "",
        "passage_instruction": "",
        "query_tokens": 64,
    }
    text = card_text(facts(kind="cross-encoder", settings=settings))
    card = ModelCard(text)
    assert card.data.pipeline_tag == "text-ranking" and "reranker" in card.data.tags
    st, hf, flag = python_blocks(text)
    for code in (st, hf, flag):
        ast.parse(code)
    assert "CrossEncoder('someone/minilm-nq')" in st
    assert "AutoModelForSequenceClassification" in hf and "max_length=160" in hf
    assert "FlagReranker(" in flag and "query_max_length=64" in flag and "max_length=160" in flag
    assert "--reranker someone/minilm-nq" in section(text, "Evaluation")


def test_a_lora_adapter_names_its_base_and_says_flagembedding_needs_the_merged_model() -> None:
    text = card_text(facts(lora=True))
    card = ModelCard(text)
    assert card.data.base_model_relation == "adapter" and "lora" in card.data.tags
    assert "merged_model" in section(text, "Usage")


def test_the_card_shows_only_numbers_the_run_measured() -> None:
    given = facts()
    text = card_text(given)
    evaluation = section(text, "Evaluation")
    shown = set(re.findall(r"\d+\.\d{4}", evaluation))
    measured = {f"{v:.4f}" for e in given.dev for v in e.metrics.values()}
    assert shown == measured
    assert "0 (base model)" in evaluation and "40 (best)" in evaluation
    assert "Not measured by this run" in evaluation.split("### Test set")[1]
    training = section(text, "Training")
    assert "12.2 s" in training and "480.5 texts/s" in training
    assert "peak memory" not in training  # not in the facts: not in the card


def test_without_dev_set_or_figures_nothing_is_filled_in() -> None:
    given = facts(dev=[], best_step=None, training={}, data=DataSummary(["a.jsonl"], 3, 9))
    text = card_text(given)
    assert "Not evaluated: the run had no dev set." in text
    assert "- dev set: none" in text
    assert "training time" not in text and "texts/s" not in text
    assert not re.findall(r"\d+\.\d{4}", text)


def test_test_metrics_appear_only_when_given() -> None:
    text = card_text(facts(test=Evaluation(40, {"ndcg@10": 0.6125})))
    assert "0.6125" in section(text, "Evaluation") and "Not measured" not in text


def test_the_record_holds_the_same_content_as_data() -> None:
    record = card_record(facts())
    assert record["front_matter"]["library_name"] == "sentence-transformers"
    assert record["budget_lines"] == BUDGET_LINES
    assert record["dev"][-1] == {"step": 40, "metrics": {"ndcg@10": 0.55125, "mrr@10": 0.47}}


def test_many_evaluations_show_the_base_the_best_and_the_last() -> None:
    dev = [Evaluation(step, {"ndcg@10": step / 1000}) for step in range(0, 201, 10)]
    text = card_text(facts(dev=dev, best_step=50, step=200, total_steps=200))
    evaluation = section(text, "Evaluation")
    rows = [line for line in evaluation.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) <= 8
    assert rows[0].startswith("| 0 (base model)") and rows[-1].startswith("| 200 ")
    assert any(row.startswith("| 50 (best)") for row in rows)
    assert "of the run's 21 evaluations are shown" in evaluation


@pytest.mark.parametrize("pooling", ["cls", "mean", "last_token"])
def test_the_transformers_example_pools_as_the_encoder_does(pooling: str) -> None:
    import torch

    from embtune.models.encoder import pool

    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    code = python_blocks(card_text(facts(settings={**facts().settings, "pooling": pooling})))[1]
    body = code[code.index("    mask = ") : code.index("    return ")]
    tokenizer = type("Tokenizer", (), {"padding_side": "right"})()
    scope = {"torch": torch, "hidden": hidden, "batch": {"attention_mask": mask}}
    exec(body.replace("\n    ", "\n").strip(), {"tokenizer": tokenizer}, scope)
    assert torch.allclose(scope["embeddings"], pool(hidden, mask, pooling))
