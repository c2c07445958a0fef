"""The score cache: every pair a teacher scored, kept in SQLite, so no pair is scored twice.

One database per teacher, ``scores-<teacher key>.sqlite`` in the cache folder; the teacher
key hashes :meth:`Teacher.identity` (its weights, tokenizer and every scoring setting), so
another model, a re-trained one saved over the same folder, other instructions or another
precision never meet old scores. A pair's key hashes the teacher key, the query and the
passage. Scores are committed after every batch: a run killed at any point keeps what it
computed, and the next run starts where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from embtune.errors import UsageError

# Keys per SELECT: under SQLite's smallest limit on bound parameters (999 before 3.32).
LOOKUP_CHUNK = 500


def teacher_key(identity: Mapping[str, object]) -> str:
    """The sha256 hex of a teacher's identity."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    """The database of the teacher with this key."""
    return Path(cache_dir) / f"scores-{key[:32]}.sqlite"


class ScoreCache:
    """Scores by pair key, in one SQLite file; use as a context manager (closes the file)."""

    def __init__(self, path: Path, identity: Mapping[str, object]) -> None:
        self.path = Path(path)
        self.teacher = teacher_key(identity).encode()
        try:
            # A second run on the same teacher waits for the other's commit instead of failing.
            self.db = sqlite3.connect(self.path, timeout=60)
            with self.db:
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS scores (key BLOB PRIMARY KEY, score REAL NOT NULL)"
                    " WITHOUT ROWID"
                )
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS teacher (name TEXT PRIMARY KEY, value TEXT)"
                )
                # For whoever opens the file: which teacher and settings these scores are of.
                self.db.executemany(
                    "INSERT OR REPLACE INTO teacher VALUES (?, ?)",
                    [(str(k), json.dumps(v)) for k, v in identity.items()],
                )
        except sqlite3.Error as exc:
            raise UsageError(
                f"--cache-dir: cannot use the score cache {self.path}: {exc}; remove the file "
                "or choose another --cache-dir"
            ) from None

    @classmethod
    def in_folder(cls, cache_dir: str | Path, identity: Mapping[str, object]) -> ScoreCache:
        """The cache of the teacher with this identity in ``cache_dir`` (made when new)."""
        return cls(cache_path(Path(cache_dir), teacher_key(identity)), identity)

    def key(self, query: str, passage: str) -> bytes:
        """The key of one (query, passage) pair under this teacher."""
        digest = hashlib.sha256(self.teacher)
        for text in (query, passage):
            data = text.encode("utf-8")
            # Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.digest()

    def lookup(self, keys: Iterable[bytes]) -> dict[bytes, float]:
        """The cached scores among ``keys``."""
        keys = list(keys)
        found: dict[bytes, float] = {}
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, score FROM scores WHERE key IN ({marks})"
            found.update(self.db.execute(query, chunk).fetchall())
        return found

    def store(self, scores: Mapping[bytes, float]) -> None:
        """Add scores and commit them (they survive a kill from now on)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", scores.items())

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
