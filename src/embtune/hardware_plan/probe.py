"""Worst-case rows for measuring: the data's own longest texts, so no peak is underestimated.

A step's memory is set by its longest batch. Measuring on random rows would report a typical
step and let the longest one run out of memory mid-epoch (the OOM reports FlagEmbedding users
file); every probe row is therefore made of the longest queries and passages of the data
(after truncation to the max lengths), and every measured step is a worst-case step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from embtune.data.formats import Record

# Texts tokenized to find the longest: all of them up to this many, else the longest by
# characters (token counts follow character counts closely enough to pick candidates).
_MAX_TOKENIZED = 20_000


def _longest(texts: Sequence[str], tokenizer: object, max_len: int, count: int) -> list[str]:
    distinct = sorted(set(texts), key=len, reverse=True)[:_MAX_TOKENIZED]
    encoded = tokenizer(distinct, truncation=True, max_length=max_len)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    ranked = sorted(zip(lengths, distinct, strict=True), key=lambda item: -item[0])
    return [text for _, text in ranked[: max(count, 1)]]


def write_probe_rows(
    records: Sequence[Record],
    tokenizer: object,
    query_max_len: int,
    passage_max_len: int,
    rows: int,
    group_size: int,
    path: Path,
) -> None:
    """``rows`` FlagEmbedding rows of the longest texts (1 positive + group_size - 1 negatives
    each, all distinct) written to ``path``; enough distinct texts for every slot."""
    queries = _longest([r.query for r in records], tokenizer, query_max_len, rows)
    passages_needed = rows * group_size
    passages = _longest(
        [p for r in records for p in (*r.pos, *r.neg)], tokenizer, passage_max_len, passages_needed
    )
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            group = [passages[(i * group_size + j) % len(passages)] for j in range(group_size)]
            row = {"query": queries[i % len(queries)], "pos": group[:1], "neg": group[1:]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
