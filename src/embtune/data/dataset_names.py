"""The name a BEIR folder goes by in reports: MTEB's task name for BEIR's own data sets,
else the folder's name.

BEIR's archives unpack to lower-case folders (``scifact``, ``fiqa``, ``trec-covid``); MTEB
names the same data sets otherwise (``SciFact``, ``FiQA2018``, ``TRECCOVID``), and its result
files and leaderboard use those names. A folder called as BEIR calls one of them is shown and
written under MTEB's name, so a result compares with MTEB's figures at a glance; any other
folder keeps its own name.
"""

from __future__ import annotations

import os
from pathlib import Path

# BEIR's folder name -> MTEB's task name, for the BEIR data sets MTEB holds as one task each
# (cqadupstack is twelve tasks in MTEB, so it keeps its folder's name).
MTEB_TASK_NAMES = {
    "arguana": "ArguAna",
    "climate-fever": "ClimateFEVER",
    "dbpedia-entity": "DBPedia",
    "fever": "FEVER",
    "fiqa": "FiQA2018",
    "hotpotqa": "HotpotQA",
    "msmarco": "MSMARCO",
    "nfcorpus": "NFCorpus",
    "nq": "NQ",
    "quora": "QuoraRetrieval",
    "scidocs": "SCIDOCS",
    "scifact": "SciFact",
    "trec-covid": "TRECCOVID",
    "webis-touche2020": "Touche2020",
}


def dataset_name(folder: str | os.PathLike[str]) -> str:
    """The name of the data set in ``folder``: MTEB's task name when the folder is named as
    BEIR names one of its data sets (``data/scifact`` -> ``SciFact``), else the folder's own
    name (``.`` and ``data/scifact/`` name the folder they stand for)."""
    name = Path(os.path.abspath(folder)).name
    return MTEB_TASK_NAMES.get(name.lower(), name)
