"""A ranking written as a TREC run: trec_eval's and pytrec_eval's input, and what
`embtune eval --trec-run` writes.

Each line is ``qid Q0 docid rank score tag``, columns separated by one space: a query's
documents best first, ranked as the metrics rank them (score descending, ties by doc id
descending: trec_eval's own order), ``rank`` from 1, ``score`` written so that it reads back
to the same number (Python's shortest round-trip form), and ``tag`` the run's name. Read back
by trec_eval, pytrec_eval or ``embtune eval --candidates``, the file gives the metrics that
were computed from it. Ids and the tag must not contain white space: the columns could not be
told apart.

Example::

    write_trec_run(Path("run.trec"), {"q1": {"d3": 0.71, "d1": 0.64}}, tag="embtune")
    # q1 Q0 d3 1 0.71 embtune
    # q1 Q0 d1 2 0.64 embtune
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.atomic import atomic_write
from embtune.errors import UsageError, shorten
from embtune.eval.retrieval import rank_documents

if TYPE_CHECKING:
    from embtune.data.formats import BeirDataset

DEFAULT_TAG = "embtune"

Run = Mapping[str, Mapping[str, float]]


def _is_one_word(text: str) -> bool:
    """True when ``text`` is one non-empty column of a white-space separated line."""
    return text.split() == [text]


def check_tag(tag: str, option: str = "--trec-run-tag") -> str:
    """``tag`` when it can be a TREC run's last column, else a UsageError naming ``option``."""
    if not isinstance(tag, str) or not _is_one_word(tag):
        raise UsageError(
            f"{option}: the run name must be one word without white space (the TREC format "
            f"separates its columns by white space), got {tag!r}"
        )
    return tag


def check_ids(data: BeirDataset, option: str = "--trec-run") -> None:
    """Refuse data whose judged query ids or document ids contain white space: a TREC line
    could not hold them."""
    for kind, ids in (("query", data.qrels), ("document", data.corpus)):
        if (bad := next((i for i in ids if not _is_one_word(i)), None)) is not None:
            raise UsageError(
                f"{option}: {kind} id {shorten(bad)} contains white space, which a TREC run "
                "cannot hold (its columns are separated by white space); write --json instead"
            )


def trec_lines(run: Run, tag: str = DEFAULT_TAG) -> Iterator[str]:
    """The lines of ``run`` ({query id: {doc id: score}}) in TREC format, each ending in a
    newline: queries in the run's order, each one's documents best first."""
    for qid, docs in run.items():
        for rank, doc in enumerate(rank_documents(docs), start=1):
            yield f"{qid} Q0 {doc} {rank} {float(docs[doc])!r} {tag}\n"


def write_trec_run(path: Path, run: Run, tag: str = DEFAULT_TAG) -> None:
    """Write ``run`` to ``path`` in TREC format, atomically (the whole file or none)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(trec_lines(run, tag))

    atomic_write(path, write)
