"""FlagEmbedding's FlagReranker and embtune score a saved embtune reranker's pairs the same.

Scores SciFact test pairs (each judged query with its first judged document and two others)
with ``FlagReranker(path).compute_score(pairs, max_length=L)`` in the FlagEmbedding anchor venv
(bench/anchors/setup.sh) and with embtune's reranker scorer (``load_reranker``: what `embtune
eval --reranker` and `embtune score` use) here, and prints the largest difference.

    .venv/bin/python bench/flagreranker_parity.py --reranker runs/reranker/best
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
FLAG_PYTHON = BENCH / ".venv-flagembedding" / "bin" / "python"

FLAG_CHILD = """
import json, sys
from FlagEmbedding import FlagReranker
pairs, path, length = json.load(sys.stdin), sys.argv[1], int(sys.argv[2])
reranker = FlagReranker(path, use_fp16=False, devices=["cpu"])
print(json.dumps(reranker.compute_score(pairs, max_length=length, batch_size=16)))
"""


def sample_pairs(data: Path, queries: int) -> list[list[str]]:
    """(query, passage) pairs of the first judged queries: a positive and two other passages."""
    from embtune.data.formats import load_beir

    beir = load_beir(data, "test")
    corpus = list(beir.corpus)
    pairs = []
    for number, (qid, judged) in enumerate(list(beir.qrels.items())[:queries]):
        docs = [next(iter(judged)), corpus[number * 7 % len(corpus)], corpus[number * 13 + 1]]
        pairs += [[beir.queries[qid], beir.corpus[d]] for d in docs]
    return pairs


def main() -> int:
    """Score with both, print the comparison; exit 1 when they differ by more than 1e-4."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reranker", required=True)
    parser.add_argument("--data", type=Path, default=BENCH.parent.parent / "shared/data/scifact")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    from embtune.eval.reranking import load_reranker

    ours = load_reranker(args.reranker)
    length = ours.settings.pair_max_length
    pairs = sample_pairs(args.data, args.queries)
    embtune_scores = ours.score_pairs([q for q, _ in pairs], [p for _, p in pairs])
    done = subprocess.run(
        [str(FLAG_PYTHON), "-c", FLAG_CHILD, args.reranker, str(length)],
        input=json.dumps(pairs),
        capture_output=True,
        text=True,
        check=True,
    )
    flag_scores = json.loads(done.stdout.strip().splitlines()[-1])
    worst = max(abs(a - b) for a, b in zip(embtune_scores, flag_scores, strict=True))
    print(
        f"{len(pairs)} pairs, max length {length}: largest |embtune - FlagReranker| = {worst:.2e}"
    )
    print("command: " + " ".join([sys.executable, *sys.argv]))
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
