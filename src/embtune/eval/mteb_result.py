"""Metrics as an MTEB result file: what `embtune eval --mteb-json` writes.

The layout is MTEB's ``TaskResult`` (mteb/results/task_result.py, the JSON its ``to_disk``
writes and ``from_disk`` reads)::

    {
      "dataset_revision": null,
      "task_name": "SciFact",
      "mteb_version": null,
      "scores": {"test": [{"ndcg_at_10": 0.6451, "mrr_at_10": ..., "recall_at_100": ...,
                           "map_at_100": ..., "main_score": 0.6451, "hf_subset": "default",
                           "languages": []}]},
      "evaluation_time": 41.2,
      "kg_co2_emissions": null
    }

Every metric embtune computes is written under MTEB's name for it (``ndcg@10`` ->
``ndcg_at_10``, likewise ``mrr_at_k``, ``recall_at_k``, ``map_at_k``), computed as MTEB
computes retrieval (trec_eval's definitions, eval/retrieval.py). ``main_score`` is
``ndcg_at_10``, MTEB's main score of retrieval tasks, so the cut-offs must include 10. The
split is the evaluated one and ``hf_subset`` is ``"default"``, as for MTEB's monolingual tasks.

What embtune cannot know is left empty, not made up:

* ``dataset_revision``: the Hugging Face dataset revision the BEIR folder was made from (null
  unless given). MTEB's loader requires a string here: give the revision when you know it.
* ``languages``: the data's languages as MTEB writes them (``eng-Latn``) ([] unless given).
  MTEB's score aggregations count only results with languages.
* ``mteb_version``: null, because MTEB did not compute these figures.
* ``kg_co2_emissions``: null (not measured).

MTEB's other retrieval scores (precision_at_k, nauc_*, hit_rate_at_k) are not computed and so
not written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from embtune.errors import UsageError

MAIN_SCORE = "ndcg_at_10"
HF_SUBSET = "default"
# MTEB's language codes: ISO 639-3 language, ISO 15924 script (eng-Latn, zho-Hans).
LANGUAGE_CODE = re.compile(r"[a-z]{3}-[A-Z][a-z]{3}")


def mteb_metric_name(key: str) -> str:
    """A metric's name in MTEB's results: ``ndcg@10`` -> ``ndcg_at_10``."""
    name, _, k = key.partition("@")
    return f"{name}_at_{k}"


def check_main_score(k_values: Iterable[int], option: str = "--mteb-json") -> None:
    """Refuse cut-offs without 10: MTEB's main score of retrieval is nDCG@10."""
    if 10 not in k_values:
        raise UsageError(
            f"{option}: MTEB's main score is nDCG@10, but --k does not include 10; add it "
            f"(--k 10 {' '.join(map(str, sorted(set(k_values))))})"
        )


def check_languages(languages: Iterable[str], option: str = "--mteb-languages") -> list[str]:
    """The languages as a list, each one an MTEB language code (``eng-Latn``)."""
    values = [languages] if isinstance(languages, str) else list(languages)
    for value in values:
        if not isinstance(value, str) or not LANGUAGE_CODE.fullmatch(value):
            raise UsageError(
                f"{option}: {value!r} is not a language code as MTEB writes them: ISO 639-3 "
                "language and ISO 15924 script, such as eng-Latn or zho-Hans"
            )
    return values


def task_result(
    metrics: Mapping[str, float],
    *,
    task_name: str,
    split: str,
    evaluation_time: float,
    dataset_revision: str | None = None,
    languages: Iterable[str] = (),
) -> dict:
    """The MTEB result record of ``metrics`` ({"ndcg@10": ...}, including ``ndcg@10``) on
    ``split`` of the task ``task_name`` (the module's docstring shows the layout)."""
    scores = {mteb_metric_name(key): float(value) for key, value in metrics.items()}
    return {
        "dataset_revision": dataset_revision,
        "task_name": task_name,
        "mteb_version": None,
        "scores": {
            split: [
                {
                    **scores,
                    "main_score": scores[MAIN_SCORE],
                    "hf_subset": HF_SUBSET,
                    "languages": list(languages),
                }
            ]
        },
        "evaluation_time": round(evaluation_time, 3),
        "kg_co2_emissions": None,
    }
