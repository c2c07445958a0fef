"""Scoring many pairs: each distinct pair once, the cache first, the rest in length-sorted
batches, every batch committed to the cache before the next starts.

Batches hold pairs of similar length (longest first), so little padding is computed and a
batch too large for memory fails at once rather than after hours. The length is counted in
characters: tokenizing every pair twice would cost more than the padding it saves.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from embtune.errors import TrainingStopped, shorten
from embtune.scoring.cache import ScoreCache
from embtune.scoring.teachers import PairScorer


@dataclass
class PairCounts:
    """How the scores of a run were found."""

    pairs: int = 0  # (query, passage) pairs of the rows
    distinct: int = 0  # distinct pairs: each scored (or found) once
    cached: int = 0  # distinct pairs found in the cache
    computed: int = 0  # distinct pairs the teacher scored in this run


def score_all(
    teacher: PairScorer,
    pairs: Sequence[tuple[str, str]],
    cache: ScoreCache | None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[list[float], PairCounts]:
    """The teacher's score of every (query, passage) pair, in input order, and the counts.

    Without a cache (None) each distinct pair is still scored once, and nothing is kept.
    Raises TrainingStopped when the teacher gives a non-finite score (no data format holds
    one); the scores committed before it stay cached.
    """
    # Without a cache the pair itself is its key: equal texts are still scored once.
    keys: list[Hashable] = list(pairs) if cache is None else [cache.key(q, p) for q, p in pairs]
    first: dict[Hashable, int] = {}  # each distinct pair's key -> its first place
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    known: dict[Hashable, float] = {} if cache is None else dict(cache.lookup(first))
    todo = [i for key, i in first.items() if key not in known]
    todo.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    bar = tqdm(
        total=len(todo), desc="scoring pairs", unit="pair", disable=not show_progress, leave=False
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        scores = teacher.score_pairs([pairs[i][0] for i in batch], [pairs[i][1] for i in batch])
        _refuse_non_finite(scores, [pairs[i] for i in batch], len(todo) - start, cache)
        found = {keys[i]: score for i, score in zip(batch, scores, strict=True)}
        if cache is not None:
            cache.store(found)
        known.update(found)
        bar.update(len(batch))
    bar.close()
    counts = PairCounts(len(pairs), len(first), len(first) - len(todo), len(todo))
    return [known[key] for key in keys], counts


def _refuse_non_finite(
    scores: list[float], pairs: list[tuple[str, str]], left: int, cache: ScoreCache | None
) -> None:
    """Stop before a NaN or infinite score is cached or written (no reader accepts one)."""
    kept = "" if cache is None else ", the scores before this batch are cached"
    for score, (query, passage) in zip(scores, pairs, strict=True):
        if not math.isfinite(score):
            raise TrainingStopped(
                f"the teacher scored the pair (query {shorten(query)}, passage "
                f"{shorten(passage)}) {score}; {left} pairs were not scored{kept} (is the model "
                "broken, or overflowing in --bf16?)"
            )
