"""Exact nearest-neighbour search over embeddings, shared by evaluation and mining.

Scores are inner products (cosine similarity for normalized embeddings). The corpus is scanned
in chunks so memory stays bounded by ``chunk_size`` x queries, not corpus x queries; each chunk's
top-k is merged into a running top-k.
"""

from __future__ import annotations

import torch


def exact_search(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    chunk_size: int = 50_000,
    query_batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` corpus rows per query by inner product: (scores [Q, k], indices [Q, k]).

    ``k`` is capped at the corpus size. Ties keep the lower corpus index first, so results are
    deterministic.
    """
    k = min(k, corpus.shape[0])
    n_queries = queries.shape[0]
    all_scores = torch.empty(n_queries, k, dtype=torch.float32)
    all_indices = torch.empty(n_queries, k, dtype=torch.long)
    for q_start in range(0, n_queries, query_batch_size):
        q = queries[q_start : q_start + query_batch_size].float()
        best_scores: torch.Tensor | None = None
        best_indices: torch.Tensor | None = None
        for c_start in range(0, corpus.shape[0], chunk_size):
            chunk = corpus[c_start : c_start + chunk_size].float()
            scores = q @ chunk.T
            top = min(k, scores.shape[1])
            s, i = scores.topk(top, dim=1, sorted=True)
            i = i + c_start
            if best_scores is None:
                best_scores, best_indices = s, i
            else:
                merged_s = torch.cat([best_scores, s], dim=1)
                merged_i = torch.cat([best_indices, i], dim=1)
                s2, pick = merged_s.topk(k, dim=1, sorted=True)
                best_scores, best_indices = s2, merged_i.gather(1, pick)
        assert best_scores is not None and best_indices is not None
        all_scores[q_start : q_start + len(q)] = best_scores
        all_indices[q_start : q_start + len(q)] = best_indices
    return all_scores, all_indices
