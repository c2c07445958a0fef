"""Our retrieval metrics against pytrec_eval (trec_eval) on random graded runs."""

from __future__ import annotations

import random

import pytest

from embtune.errors import UsageError
from embtune.eval.retrieval import (
    format_metrics,
    rank_documents,
    retrieval_metrics,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

K_VALUES = (1, 3, 5, 10, 20, 100)
TOLERANCE = 1e-6


def random_case(seed: int, n_queries: int = 400, tied: bool = False):
    """Graded qrels (0..3) and a run over a shared pool of documents (distinct scores
    unless ``tied``).

    Some judged queries retrieve nothing, some have only non-relevant judgements, and some
    run queries have no judgements at all: each must be handled like trec_eval.
    """
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 25))
        qrels[qid] = {d: rng.choice((0, 0, 1, 1, 2, 3)) for d in judged}
        if q % 37 == 0:
            qrels[qid] = {d: 0 for d in judged}
        if q % 29 == 0:
            continue  # nothing retrieved for this query
        retrieved = rng.sample(docs, rng.randint(1, 150))
        # Bias the run towards judged documents so the metrics are not all near zero.
        retrieved += [d for d in judged if rng.random() < 0.6 and d not in retrieved]
        # Relevant documents often score higher, so the metrics are neither ~0 nor ~1.
        boost = {d: rel * rng.random() for d, rel in qrels[qid].items()}
        if tied:
            # Few distinct values: most documents share a score with others.
            run[qid] = {d: float(rng.randint(0, 4) + round(boost.get(d, 0))) for d in retrieved}
        else:
            run[qid] = {d: rng.random() + boost.get(d, 0.0) for d in retrieved}
    for q in range(n_queries, n_queries + 20):
        run[f"q{q}"] = {d: rng.random() for d in rng.sample(docs, 10)}
    return qrels, run


def trec_eval_metrics(qrels, run, k_values) -> dict[str, float]:
    """pytrec_eval's figures, averaged over every judged query (missing ones count 0)."""
    cuts = ",".join(map(str, k_values))
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {f"ndcg_cut.{cuts}", f"map_cut.{cuts}", f"recall.{cuts}"}
    )
    per_query = evaluator.evaluate(run)
    out: dict[str, float] = {}
    for k in k_values:
        out[f"ndcg@{k}"] = sum(per_query.get(q, {}).get(f"ndcg_cut_{k}", 0.0) for q in qrels)
        out[f"recall@{k}"] = sum(per_query.get(q, {}).get(f"recall_{k}", 0.0) for q in qrels)
        out[f"map@{k}"] = sum(per_query.get(q, {}).get(f"map_cut_{k}", 0.0) for q in qrels)
        # trec_eval's recip_rank has no cut-off: evaluate it on the run truncated to top k,
        # truncated in trec_eval's own order (score desc, doc id desc).
        truncated = {q: {d: docs[d] for d in rank_documents(docs)[:k]} for q, docs in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(truncated)
        out[f"mrr@{k}"] = sum(rr.get(q, {}).get("recip_rank", 0.0) for q in qrels)
    return {key: value / len(qrels) for key, value in out.items()}


@pytest.mark.parametrize(("seed", "tied"), [(0, False), (1, False), (2, True)])
def test_metrics_equal_pytrec_eval(seed: int, tied: bool) -> None:
    qrels, run = random_case(seed, tied=tied)
    ours = retrieval_metrics(run, qrels, K_VALUES)
    reference = trec_eval_metrics(qrels, run, K_VALUES)
    assert set(ours) == set(reference)
    mismatches = {
        key: (ours[key], reference[key])
        for key in reference
        if abs(ours[key] - reference[key]) > TOLERANCE
    }
    assert not mismatches
    # Guard against a degenerate case where everything is 0 and trivially equal.
    assert 0.1 < ours["ndcg@10"] < 0.9
    assert 0.1 < ours["recall@100"] < 1.0


def test_key_order_and_names() -> None:
    qrels, run = random_case(3, n_queries=20)
    keys = list(retrieval_metrics(run, qrels, (100, 10, 10)))
    assert keys == [
        "ndcg@10",
        "ndcg@100",
        "mrr@10",
        "mrr@100",
        "recall@10",
        "recall@100",
        "map@10",
        "map@100",
    ]


def test_ranked_lists_equal_score_dicts() -> None:
    qrels, run = random_case(4, n_queries=50)
    as_lists = {q: rank_documents(docs) for q, docs in run.items()}
    assert retrieval_metrics(as_lists, qrels) == retrieval_metrics(run, qrels)


def test_perfect_and_empty_runs() -> None:
    qrels = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"x": 1}}
    perfect = {"q1": ["a", "b", "c", "z"], "q2": ["x"]}
    metrics = retrieval_metrics(perfect, qrels, (1, 10))
    # q1's first hit is its best, so every metric is 1 except recall@1 (1 of 2 relevant)
    # and map@1 (precision 1 at rank 1 over 2 relevant documents).
    assert metrics["ndcg@1"] == metrics["ndcg@10"] == 1.0
    assert metrics["mrr@1"] == metrics["mrr@10"] == 1.0
    assert metrics["recall@10"] == metrics["map@10"] == 1.0
    assert metrics["recall@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["map@1"] == pytest.approx((0.5 + 1.0) / 2)
    # A judged query with nothing retrieved counts as 0; an empty run scores 0 everywhere.
    assert retrieval_metrics({"q1": perfect["q1"]}, qrels, (10,))["ndcg@10"] == 0.5
    assert set(retrieval_metrics({}, qrels, (10,)).values()) == {0.0}


def test_graded_ndcg_by_hand() -> None:
    # Ranking b (rel 1) above a (rel 2): DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3).
    import math

    value = retrieval_metrics({"q": ["b", "a"]}, {"q": {"a": 2, "b": 1}}, (10,))["ndcg@10"]
    assert value == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_ties_break_by_doc_id_descending() -> None:
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]
    assert rank_documents(["x", "y", "x"]) == ["x", "y"]


@pytest.mark.parametrize("bad", [[0], [-5], [], [2.5], [True]])
def test_bad_cut_offs_are_usage_errors(bad) -> None:
    with pytest.raises(UsageError, match="--k"):
        retrieval_metrics({}, {"q": {"a": 1}}, bad)


def test_format_metrics_table() -> None:
    table = format_metrics(
        {"ndcg@10": 0.64512, "ndcg@100": 0.7, "mrr@10": 0.6, "recall@100": 0.925},
        title="scifact/test",
    )
    lines = table.splitlines()
    assert lines[0] == "scifact/test"
    assert "@10" in lines[1] and "@100" in lines[1]
    assert lines[2].startswith("nDCG") and "0.6451" in lines[2] and "0.7000" in lines[2]
    # A metric missing at one cut-off shows a dash, and columns stay aligned.
    assert lines[4].startswith("Recall") and "-" in lines[4] and "0.9250" in lines[4]
    assert len({len(line) for line in lines[1:]}) == 1
