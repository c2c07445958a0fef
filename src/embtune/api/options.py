"""Checks of option values shared by the jobs of embtune.api.

The command line passes its text, Python callers pass numbers: both are checked here alike, and a
bad value is a :class:`~embtune.errors.UsageError` with the message the command prints.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from embtune.errors import TrainingStopped, UsageError

PathLike = str | os.PathLike[str]


def int_option(value: int | str, option: str, minimum: int, sep: str = ": ") -> int:
    """``value`` as a whole number >= ``minimum``, else a UsageError naming ``option``.

    ``sep`` follows each command's existing wording: inspect's options, shared with train,
    read like train's (``--batch-size must be ...``), mine's and eval's put a colon.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"{option}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise UsageError(f"{option}{sep}must be at least {minimum}, got {number}")
    return number


def optional_int(value: int | str | None, option: str, minimum: int) -> int | None:
    return None if value is None else int_option(value, option, minimum)


def optional_float(value: float | str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{option}: expected a finite number, got {value!r}")
    return number


def choice(value: str | None, option: str, choices: tuple[str, ...]) -> str | None:
    # argparse checks choices on the command line; Python callers get the same check here.
    if value is not None and value not in choices:
        raise UsageError(f"{option}: {value!r} is not one of {', '.join(choices)}")
    return value


def output_file(path: PathLike, option: str, *, make_folders: bool = False) -> Path:
    """``path`` as a Path that can be written, checked before any work is done.

    Its folder must exist and be writable; with ``make_folders`` (the writer creates missing
    folders) the nearest existing folder above it must be writable instead.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; give a file name")
    folder = path.parent
    if make_folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.exists():
        raise UsageError(f"{option}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{option}: {folder} is not a folder")
    if reason := unwritable(folder):
        raise UsageError(f"{option}: cannot write to folder {folder}: {reason}")
    return path


def input_files(data: Path, split: str) -> list[Path]:
    """The files a data option names: a BEIR folder's corpus, queries and ``split`` qrels, or
    the FlagEmbedding file(s) of a file or folder."""
    from embtune.data.formats import is_beir_dir, training_files

    if is_beir_dir(data):
        return [data / "corpus.jsonl", data / "queries.jsonl", data / "qrels" / f"{split}.tsv"]
    return training_files(data) if data.exists() else []


def refuse_input_as_output(out: Path, inputs: Sequence[Path], option: str, what: str) -> None:
    """Refuse an output file that is one of the inputs (also by another path: a symlink, a hard
    link), which writing ``what`` would destroy."""
    if not out.exists():
        return
    for path in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(out, path):
                raise UsageError(
                    f"{option}: {out} is one of the input files ({path}); write {what} to "
                    "another file"
                )


def unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder``, or None when it can."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # access() says yes to root everywhere, yet root is refused on read-only mounts, sysfs,
        # immutable folders or NFS with root squashing: only creating a file tells.
        try:
            fd, name = tempfile.mkstemp(dir=folder, prefix=".embtune-write-check.", suffix=".tmp")
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def save_result(path: Path, write: Callable[[], None], work: str, option: str) -> None:
    """Run ``write`` (an atomic write of ``path``); an OSError (a full disk, say) stops the
    command with status 3, saying that ``work`` was done but is lost and how to retry.

    Nothing half-written is left: the atomic writer removes its temporary file.
    """
    try:
        write()
    except OSError as exc:
        raise TrainingStopped(
            f"could not write {path}: {exc.strerror or exc}; {work} was done but not saved: "
            f"free some space (or choose another {option}) and run the command again"
        ) from exc


def save_json(path: Path, record: object, work: str, option: str) -> None:
    """:func:`save_result` of a JSON file written atomically."""
    from embtune.atomic import write_json_atomically

    save_result(path, lambda: write_json_atomically(path, record), work, option)


def rejected_rows_file(output: Path) -> Path:
    """Where ``--skip-bad-rows`` lists the rows left out: beside ``output``, as
    ``<stem>.rejected_rows.jsonl`` (mined.jsonl -> mined.rejected_rows.jsonl)."""
    return output.with_name(f"{output.stem}.rejected_rows.jsonl")


def path_list(value: PathLike | Sequence[PathLike]) -> list[str]:
    """One path or several, as the list of strings the readers and TrainConfig take."""
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def precision(bf16: bool) -> str:
    """The encode precision of ``--bf16`` (one of embtune.choices.ENCODE_PRECISIONS)."""
    return "bf16" if bf16 else "fp32"
