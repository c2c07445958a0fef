"""Held-out dev queries for evaluation during training (never the test split).

SciFact and many BEIR sets have only train and test. Selecting checkpoints on test overstates
quality, so ``--dev-fraction`` carves a seeded share of the *training* queries out as a dev
set: they are removed from training and used to evaluate retrieval while training runs. The
split is saved with the run (``dev_split.json``) so it can be reproduced and audited.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from embtune.data.formats import BeirDataset, Record
from embtune.errors import UsageError


def carve_dev_split(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(training rows, dev rows): a seeded ``fraction`` of the rows, at least one, held out."""
    if not 0 < fraction < 1:
        raise UsageError(f"--dev-fraction must be between 0 and 1, got {fraction}")
    count = max(1, round(len(records) * fraction))
    if count >= len(records):
        raise UsageError(
            f"--dev-fraction {fraction} would hold out all {len(records)} training rows"
        )
    held = set(np.random.default_rng([seed, 0xDE5]).choice(len(records), count, replace=False))
    train = [r for i, r in enumerate(records) if i not in held]
    dev = [r for i, r in enumerate(records) if i in held]
    return train, dev


def dev_dataset(dev: list[Record], corpus: dict[str, str]) -> BeirDataset:
    """A retrieval set from held-out rows: their queries, their positives as judgements.

    ``corpus`` is what is searched (id -> text); a positive missing from it (jsonl rows carry
    texts, not ids) is added under a synthetic id, so every judged document can be found.
    """
    corpus = dict(corpus)
    by_text = {text: doc_id for doc_id, text in corpus.items()}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for index, row in enumerate(dev):
        qid = row.query_id or f"dev-{index}"
        queries[qid] = row.query
        judged: dict[str, int] = {}
        for position, text in enumerate(row.pos):
            doc_id = row.pos_ids[position] if row.pos_ids else by_text.get(text)
            if doc_id is None or doc_id not in corpus:
                doc_id = f"dev-pos-{len(corpus)}"
                corpus[doc_id] = text
                by_text[text] = doc_id
            judged[doc_id] = 1
        qrels[qid] = judged
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels)


def passage_corpus(records: list[Record]) -> dict[str, str]:
    """Every distinct pos/neg text of jsonl rows as a searchable corpus (ids p0, p1, ...)."""
    texts = dict.fromkeys(t for r in records for t in (*r.pos, *r.neg))
    return {f"p{i}": text for i, text in enumerate(texts)}


def save_dev_split(path: Path, dev: list[Record], fraction: float, seed: int) -> None:
    """Record which rows were held out, by query id or by file:line."""
    rows = [{"query_id": r.query_id, "source": r.source, "query": r.query} for r in dev]
    payload = {"dev_fraction": fraction, "seed": seed, "rows": rows}
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
