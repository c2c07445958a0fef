"""Anchor: all-MiniLM-L6-v2 on SciFact test reproduces the published MTEB nDCG@10 (64.51)."""

from __future__ import annotations

import json
import time

import pytest

from embtune.cli import main
from tests.conftest import SCIFACT

REFERENCE_NDCG_AT_10 = 0.6451


@pytest.mark.slow
def test_minilm_scifact_matches_mteb(minilm, tmp_path) -> None:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (set EMBTUNE_SHARED_DATA)")
    out = tmp_path / "scifact.json"
    started = time.perf_counter()
    # The model's saved settings apply: mean pooling, normalized, passages cut at 256 tokens.
    rc = main(
        [
            "eval",
            "--model",
            str(minilm),
            "--data",
            str(SCIFACT),
            "--split",
            "test",
            "--batch-size",
            "64",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    print(
        f"SciFact test: nDCG@10 {record['ndcg@10']:.4f}, recall@100 "
        f"{record['recall@100']:.4f}, MRR@10 {record['mrr@10']:.4f} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    assert record["settings"]["pooling"] == "mean" and record["settings"]["normalize"]
    assert record["settings"]["passage_max_len"] == 256
    assert record["queries"] == 300 and record["corpus_size"] == 5183
    assert record["ndcg@10"] == pytest.approx(REFERENCE_NDCG_AT_10, abs=0.002)
    # Internal consistency: more documents can only find more relevant ones.
    assert record["recall@10"] <= record["recall@100"] <= 1.0
    assert record["mrr@10"] <= record["mrr@100"]
