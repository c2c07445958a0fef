"""Retrieval evaluation: trec_eval-exact metrics, cached corpus encoding and top-k search.

The metrics reproduce ``trec_eval`` (and so ``pytrec_eval``, BEIR and MTEB) exactly:

* a document is relevant when its judged relevance is >= 1;
* nDCG uses linear gain (the relevance value) and a ``log2(rank + 1)`` discount; the ideal
  ranking is every judged relevant document sorted by relevance, cut at k;
* Recall@k and MAP@k divide by the number of relevant documents for the query (not by k);
* documents with equal scores are ranked by document id, descending (trec_eval's order);
* every query with judgements counts in the average; one with nothing retrieved scores 0.

Corpus embeddings can be cached on disk (``cache_dir``). The cache key covers everything that
changes a passage vector: the model's weights (hashed byte for byte, so a model fine-tuned and
saved over the same folder never hits an old entry), its config and tokenizer, pooling,
normalization, passage instruction and max length, device type and dtype, and the passages.

Example::

    enc = Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    data = load_beir(Path("scifact"), "test")
    metrics = evaluate_retrieval(enc, data, k_values=(10, 100), cache_dir=Path(".cache"))
    print(format_metrics(metrics))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embtune.atomic import atomic_write
from embtune.data.store import tokenizer_fingerprint
from embtune.errors import UsageError
from embtune.eval.search import exact_search

if TYPE_CHECKING:
    from embtune.data.formats import BeirDataset
    from embtune.models.encoder import Encoder

log = logging.getLogger(__name__)

METRICS = ("ndcg", "mrr", "recall", "map")
METRIC_LABELS = {"ndcg": "nDCG", "mrr": "MRR", "recall": "Recall", "map": "MAP"}
CACHE_FORMAT = 1

# A run: per query, either {doc id: score} (ranked here, trec_eval's way) or doc ids best first.
Run = Mapping[str, Mapping[str, float] | Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]


# --- metrics -------------------------------------------------------------------------------


def rank_documents(docs: Mapping[str, float] | Sequence[str]) -> list[str]:
    """Document ids best first.

    A score mapping is sorted by score, descending, ties by document id, descending: exactly
    trec_eval's order, so tied scores give the same metrics as pytrec_eval. A sequence is
    taken as already ranked (repeated ids keep their first position).
    """
    if isinstance(docs, Mapping):
        ranked = sorted(docs.items(), key=lambda item: (float(item[1]), item[0]), reverse=True)
        return [doc_id for doc_id, _ in ranked]
    return list(dict.fromkeys(docs))


def _num_relevant(judged: Mapping[str, int]) -> int:
    return sum(1 for rel in judged.values() if rel >= 1)


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """nDCG@k of one ranked list: linear gain, log2 discount, 0 when nothing is relevant."""
    dcg = sum(
        judged[doc] / math.log2(i + 2)
        for i, doc in enumerate(ranked[:k])
        if judged.get(doc, 0) >= 1
    )
    ideal_gains = sorted((rel for rel in judged.values() if rel >= 1), reverse=True)[:k]
    idcg = sum(gain / math.log2(i + 2) for i, gain in enumerate(ideal_gains))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top k (0 when there is none)."""
    for i, doc in enumerate(ranked[:k]):
        if judged.get(doc, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Share of the query's relevant documents found in the top k (0 when it has none)."""
    total = _num_relevant(judged)
    if total == 0:
        return 0.0
    return sum(1 for doc in ranked[:k] if judged.get(doc, 0) >= 1) / total


def map_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Average precision cut at k, divided by all relevant documents (trec_eval's map_cut)."""
    total = _num_relevant(judged)
    if total == 0:
        return 0.0
    hits = 0
    precision_sum = 0.0
    for i, doc in enumerate(ranked[:k]):
        if judged.get(doc, 0) >= 1:
            hits += 1
            precision_sum += hits / (i + 1)
    return precision_sum / total


METRIC_FUNCTIONS: dict[str, Callable[[Sequence[str], Mapping[str, int], int], float]] = {
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
    "recall": recall_at_k,
    "map": map_at_k,
}


def check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated cut-offs; a UsageError names any that is not a positive integer."""
    values = list(k_values)
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not values:
        shown = ", ".join(map(repr, bad)) if bad else "none given"
        raise UsageError(f"--k: cut-offs must be positive integers ({shown})")
    return tuple(sorted(set(values)))


def retrieval_metrics(
    run: Run,
    qrels: Qrels,
    k_values: Iterable[int] = (10, 100),
    metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
    """Mean of each metric at each cut-off over the queries in ``qrels``: {"ndcg@10": ...}.

    Keys run metric by metric, cut-off by cut-off (``ndcg@10, ndcg@100, mrr@10, ...``).
    Queries in ``run`` without judgements are ignored; judged queries missing from ``run``
    score 0, as do judged queries none of whose documents is relevant.
    """
    ks = check_k_values(k_values)
    unknown = [m for m in metrics if m not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if not qrels:
        raise ValueError("no judged queries to evaluate")
    totals = {f"{m}@{k}": 0.0 for m in metrics for k in ks}
    for qid, judged in qrels.items():
        ranked = rank_documents(run.get(qid, {}))
        for m in metrics:
            for k in ks:
                totals[f"{m}@{k}"] += METRIC_FUNCTIONS[m](ranked, judged, k)
    return {key: value / len(qrels) for key, value in totals.items()}


def metric_label(key: str) -> str:
    """A metric's key as the tables show it: ``ndcg@10`` -> ``nDCG@10``."""
    name, _, k = key.partition("@")
    return f"{METRIC_LABELS.get(name, name)}@{k}"


def format_metrics(metrics: Mapping[str, float], title: str | None = None) -> str:
    """A plain-text table for the screen: one row per metric, one column per cut-off."""
    parsed: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        name, _, k = key.partition("@")
        if k.isdigit():
            parsed.setdefault(name, {})[int(k)] = value
    ks = sorted({k for row in parsed.values() for k in row})
    labels = {name: METRIC_LABELS.get(name, name) for name in parsed}
    width = max([len(label) for label in labels.values()] + [6])
    header = " " * width + "".join(f"{'@' + str(k):>9}" for k in ks)
    lines = [title] if title else []
    lines.append(header)
    for name, row in parsed.items():
        cells = "".join(f"{row[k]:>9.4f}" if k in row else f"{'-':>9}" for k in ks)
        lines.append(f"{labels[name]:<{width}}{cells}")
    return "\n".join(lines)


# --- search --------------------------------------------------------------------------------


def search_top_k(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    k: int,
    use_faiss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows per query by inner product: (scores [Q, k'], indices [Q, k']).

    ``k' = min(k, corpus size)``. Exact either way; ``use_faiss`` uses faiss's IndexFlatIP,
    which is faster on large corpora, and needs the optional ``faiss-cpu`` package.
    """
    if not use_faiss:
        return exact_search(query_embeddings, corpus_embeddings, k)
    try:
        import faiss
    except ImportError as exc:
        raise UsageError(
            "--faiss: the faiss package is not installed; install it with "
            "`pip install faiss-cpu` (or `pip install 'embtune[faiss]'`), or leave out --faiss"
        ) from exc
    k = min(k, corpus_embeddings.shape[0])
    index = faiss.IndexFlatIP(corpus_embeddings.shape[1])
    index.add(corpus_embeddings.float().contiguous().numpy())
    scores, indices = index.search(query_embeddings.float().contiguous().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(indices).long()


def retrieve(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    k: int,
    use_faiss: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """A run {query id: {doc id: score}} with the top ``k`` documents per query.

    With ``ignore_identical_ids`` (BEIR's default) a document whose id equals the query id is
    dropped; one extra document is fetched so each query still gets ``k``.
    """
    if query_embeddings.shape[0] != len(query_ids) or corpus_embeddings.shape[0] != len(doc_ids):
        raise ValueError("embedding rows and ids differ in number")
    if not len(query_ids) or not len(doc_ids):
        return {qid: {} for qid in query_ids}
    fetch = k + 1 if ignore_identical_ids else k
    scores, indices = search_top_k(query_embeddings, corpus_embeddings, fetch, use_faiss)
    run: dict[str, dict[str, float]] = {}
    rows = zip(query_ids, scores.tolist(), indices.tolist(), strict=True)
    for qid, row_scores, row_indices in rows:
        hits: dict[str, float] = {}
        for score, index in zip(row_scores, row_indices, strict=True):
            if index < 0:  # faiss pads with -1 when it has fewer results
                continue
            doc_id = doc_ids[index]
            if ignore_identical_ids and doc_id == qid:
                continue
            hits[doc_id] = score
            if len(hits) == k:
                break
        run[qid] = hits
    return run


# --- corpus embeddings and their cache -----------------------------------------------------


def model_fingerprint(encoder: Encoder) -> str:
    """sha256 of the model's class, config and every weight and buffer, byte for byte.

    Hashing the tensors themselves (not file names or times) means a model changed in memory
    or re-saved to the same folder gets a new fingerprint. sha256 runs at about 1.5 GB/s, so
    this costs ~0.1 s for a MiniLM and a few seconds for a multi-GB model.
    """
    return weights_fingerprint(encoder.model)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """:func:`model_fingerprint` of any Hugging Face model (a reranker's too)."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _hash_strings(strings: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in strings:
        data = text.encode("utf-8")
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def corpus_cache_key(
    encoder: Encoder, texts: Sequence[str], ids: Sequence[str] | None = None
) -> str:
    """The cache key of these passages under this encoder (a sha256 hex string).

    Query-side settings are left out on purpose: they do not change passage vectors.
    """
    s = encoder.settings
    parameter = next(encoder.model.parameters())
    parts = {
        "format": CACHE_FORMAT,
        "model": str(getattr(encoder.model.config, "_name_or_path", "")),
        "weights": model_fingerprint(encoder),
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "pooling": s.pooling,
        "normalize": s.normalize,
        "passage_instruction": s.passage_instruction,
        "passage_max_len": s.passage_max_len,
        # Device and precision change the vectors slightly.
        "device": parameter.device.type,
        "dtype": str(parameter.dtype),
        "encode_precision": encoder.encode_precision,
        "texts": _hash_strings(texts),
        "ids": _hash_strings(ids) if ids is not None else None,
        "count": len(texts),
    }
    if encoder.truncate_dim is not None:
        # Only when set, so the keys of entries cached before truncation existed still match.
        parts["truncate_dim"] = encoder.truncate_dim
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def corpus_cache_path(cache_dir: str | Path, key: str) -> Path:
    """Where the cache entry with this key lives."""
    return Path(cache_dir) / f"corpus-{key[:32]}.pt"


def _load_cached(path: Path, key: str, count: int) -> torch.Tensor | None:
    """The cached embeddings, or None (with a warning) when the entry is unusable."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: encode again and overwrite it
        log.warning("ignoring unreadable corpus cache %s: %s", path, exc)
        return None
    if not isinstance(entry, dict):
        entry = {}
    embeddings = entry.get("embeddings")
    if entry.get("key") != key or not isinstance(embeddings, torch.Tensor):
        log.warning("ignoring corpus cache %s: it does not match this model and corpus", path)
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        shape = tuple(embeddings.shape)
        log.warning("ignoring corpus cache %s: shape %s, expected %d rows", path, shape, count)
        return None
    return embeddings


def corpus_embeddings(
    encoder: Encoder,
    texts: Sequence[str],
    ids: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> torch.Tensor:
    """Passage embeddings [N, H] (float32, CPU, input order), from ``cache_dir`` when cached.

    Texts are embedded with :meth:`Encoder.encode_passages` (passage instruction and max
    length applied). With ``cache_dir`` the result is looked up by :func:`corpus_cache_key`
    and stored there after encoding; ``ids`` are part of the key and saved alongside.
    """
    texts = list(texts)
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    path: Path | None = None
    key = ""
    if cache_dir is not None:
        key = corpus_cache_key(encoder, texts, ids)
        path = corpus_cache_path(cache_dir, key)
        if path.is_file() and (cached := _load_cached(path, key, len(texts))) is not None:
            log.info("corpus embeddings: loaded %d from cache %s", len(texts), path)
            return cached
    embeddings = encoder.encode_passages(texts, batch_size=batch_size, show_progress=show_progress)
    if path is not None:
        entry = {
            "format": CACHE_FORMAT,
            "key": key,
            "model": str(getattr(encoder.model.config, "_name_or_path", "")),
            "ids": list(ids) if ids is not None else [],
            "embeddings": embeddings,
        }
        try:
            atomic_write(path, lambda tmp: torch.save(entry, tmp))
            log.info("corpus embeddings: cached %d in %s", len(texts), path)
        except (OSError, RuntimeError) as exc:  # a read-only or full disk must not lose the result
            # (torch.save reports a full disk as RuntimeError "unexpected pos", not OSError)
            log.warning("could not write corpus cache %s: %s", path, exc)
    return embeddings


def embed_split(
    encoder: Encoder,
    data: BeirDataset,
    batch_size: int,
    show_progress: bool,
    corpus_vectors: torch.Tensor | None,
    cache_dir: str | Path | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(judged query embeddings, corpus embeddings), the corpus from ``corpus_vectors`` or
    :func:`corpus_embeddings` (cached in ``cache_dir``)."""
    doc_ids = list(data.corpus)
    if corpus_vectors is None:
        corpus_vectors = corpus_embeddings(
            encoder,
            list(data.corpus.values()),
            doc_ids,
            cache_dir=cache_dir,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    elif corpus_vectors.ndim != 2 or corpus_vectors.shape[0] != len(doc_ids):
        raise UsageError(
            f"corpus embeddings have shape {tuple(corpus_vectors.shape)}, "
            f"but the corpus has {len(doc_ids)} documents"
        )
    queries = data.split_queries()
    query_embeddings = encoder.encode_queries(
        list(queries.values()), batch_size=batch_size, show_progress=show_progress
    )
    if query_embeddings.shape[1] != corpus_vectors.shape[1]:
        raise UsageError(
            f"query embeddings have {query_embeddings.shape[1]} dimensions but corpus "
            f"embeddings {corpus_vectors.shape[1]}: were they made by another model?"
        )
    return query_embeddings, corpus_vectors


def _search(
    query_embeddings: torch.Tensor,
    corpus_vectors: torch.Tensor,
    data: BeirDataset,
    k: int,
    use_faiss: bool,
    ignore_identical_ids: bool,
) -> dict[str, dict[str, float]]:
    """The run of the judged queries: each one's top ``k`` documents of the corpus."""
    return retrieve(
        query_embeddings,
        corpus_vectors,
        list(data.split_queries()),
        list(data.corpus),
        k,
        use_faiss=use_faiss,
        ignore_identical_ids=ignore_identical_ids,
    )


def retrieve_split(
    encoder: Encoder,
    data: BeirDataset,
    k: int,
    batch_size: int = 64,
    show_progress: bool = True,
    corpus_vectors: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
    use_faiss: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """The run {query id: {doc id: score}} of every judged query's top ``k`` documents, as
    :func:`evaluate_retrieval` ranks them (its arguments, ``k`` the depth)."""
    queries, corpus = embed_split(
        encoder, data, batch_size, show_progress, corpus_vectors, cache_dir
    )
    return _search(queries, corpus, data, k, use_faiss, ignore_identical_ids)


def evaluate_retrieval(
    encoder: Encoder,
    data: BeirDataset,
    k_values: Iterable[int] = (10, 100),
    batch_size: int = 64,
    show_progress: bool = True,
    corpus_vectors: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
    use_faiss: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, float]:
    """Embed the judged queries and the corpus, search, and score: {"ndcg@10": ..., ...}.

    Every metric of :data:`METRICS` is reported at every cut-off in ``k_values``. Queries are
    those with judgements in ``data.qrels``; the whole corpus is searched. Pass
    ``corpus_vectors`` (rows in ``data.corpus`` order, e.g. from :func:`corpus_embeddings`
    with the same encoder) to skip encoding the corpus. Like BEIR, a hit whose document id
    equals the query id is dropped unless ``ignore_identical_ids`` is False.
    """
    ks = check_k_values(k_values)
    run = retrieve_split(
        encoder,
        data,
        max(ks),
        batch_size,
        show_progress,
        corpus_vectors,
        cache_dir,
        use_faiss,
        ignore_identical_ids,
    )
    return retrieval_metrics(run, data.qrels, ks)


def evaluate_dimensions(
    encoder: Encoder,
    data: BeirDataset,
    dims: Sequence[int],
    k_values: Iterable[int] = (10, 100),
    batch_size: int = 64,
    show_progress: bool = True,
    corpus_vectors: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
    use_faiss: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[int, dict[str, float]]:
    """:func:`evaluate_retrieval` at each Matryoshka dimension: {dim: {"ndcg@10": ...}}.

    Queries and corpus are embedded once; for each dimension both are cut to their first
    ``dim`` components and re-normalized when the encoder normalizes
    (:func:`~embtune.models.encoder.truncate_embeddings`), so each block equals evaluating
    ``Encoder.from_pretrained(model, truncate_dim=dim)``. A dimension of at least the width
    is the full embedding. Other arguments as for :func:`evaluate_retrieval`.
    """
    from embtune.models.encoder import truncate_embeddings

    ks = check_k_values(k_values)
    queries, corpus = embed_split(
        encoder, data, batch_size, show_progress, corpus_vectors, cache_dir
    )
    if too_large := [d for d in dims if d > queries.shape[1]]:
        raise UsageError(
            f"--dims: {too_large[0]} is larger than the embeddings ({queries.shape[1]})"
        )
    normalize = encoder.settings.normalize
    by_dim = {}
    for dim in dict.fromkeys(dims):
        run = _search(
            truncate_embeddings(queries, dim, normalize),
            truncate_embeddings(corpus, dim, normalize),
            data,
            max(ks),
            use_faiss,
            ignore_identical_ids,
        )
        by_dim[dim] = retrieval_metrics(run, data.qrels, ks)
    return by_dim


def format_dimension_table(by_dim: Mapping[int, Mapping[str, float]]) -> str:
    """A plain-text table for the screen: one row per dimension, one column per metric@k."""
    keys = list(next(iter(by_dim.values()), {}))
    labels = [metric_label(key) for key in keys]
    width = max([len(label) for label in labels] + [8]) + 1
    lines = [f"{'dim':>5}" + "".join(f"{label:>{width}}" for label in labels)]
    for dim, metrics in by_dim.items():
        lines.append(f"{dim:>5}" + "".join(f"{metrics[k]:>{width}.4f}" for k in keys))
    return "\n".join(lines)


__all__ = [
    "METRICS",
    "check_k_values",
    "corpus_cache_key",
    "corpus_cache_path",
    "corpus_embeddings",
    "evaluate_dimensions",
    "evaluate_retrieval",
    "format_dimension_table",
    "format_metrics",
    "map_at_k",
    "metric_label",
    "model_fingerprint",
    "mrr_at_k",
    "ndcg_at_k",
    "rank_documents",
    "recall_at_k",
    "retrieval_metrics",
    "retrieve",
    "retrieve_split",
    "search_top_k",
]
