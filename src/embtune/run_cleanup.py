"""``--overwrite-output-dir``: remove a previous run's checkpoints, best model, events and state,
and only the files embtune wrote there.

Left in place they would mix with the new run's (an old checkpoint-900 would be "the newest" to
--resume, TensorBoard would draw two runs as one). But the folder is the user's: a note in
``best/``, a ``checkpoint-7/`` copied in by hand or a ``.notes.old`` must survive. So a file is
removed only when embtune's own records list it (a checkpoint's trainer_state.json manifest,
``best/``'s :data:`BEST_MANIFEST`) or, for folders written before those records existed, when
its name is one an embtune save writes. Folders are removed once empty; what was kept is said.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from embtune.checkpoint import LEFTOVER_NAME
from embtune.manifest import MANIFEST_KEY, file_manifest
from embtune.run_files import (
    BEST_DIR,
    DEV_SPLIT_FILE,
    DIMENSIONS_PLOT,
    INTERPOLATED_DIR,
    INTERPOLATION_FILE,
    INTERPOLATION_PLOT,
    INTERPOLATION_TABLE,
    MERGED_DIR,
    TENSORBOARD_DIR,
    TRAINER_STATE_FILE,
)

# A previous run's files at the top of the folder that a new run would otherwise mix with.
_RUN_FILES = (
    TRAINER_STATE_FILE,
    DEV_SPLIT_FILE,
    DIMENSIONS_PLOT,
    INTERPOLATION_FILE,
    INTERPOLATION_TABLE,
    INTERPOLATION_PLOT,
)

BEST_MANIFEST = ".embtune-files.json"  # in best/: the files the save wrote, with checksums

_CHECKPOINT = re.compile(r"checkpoint-\d+")
# What Encoder.save (transformers' save_pretrained, the tokenizer, the sentence-transformers
# modules) and accelerate's save_state write: the names a folder without records is judged by.
_SAVED_NAMES = re.compile(
    r"(config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model.*\.bin"
    r"|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)"
    r"|merges\.txt|.*\.model|modules\.json|sentence_bert_config\.json"
    r"|config_sentence_transformers\.json|embtune_encoder\.json|generation_config\.json"
    r"|adapter_config\.json|adapter_model\.safetensors"
    r"|1_Pooling/config\.json|training_state/(optimizer|scheduler)(_\d+)?\.bin"
    r"|training_state/random_states_\d+\.pkl|training_state/scaler\.pt"
    r"|training_state/custom_checkpoint_\d+\.pkl|" + re.escape(TRAINER_STATE_FILE) + ")"
)


def record_best_files(folder: Path) -> None:
    """Write ``best/``'s record of its files (called on the temporary folder before the
    rename, so the record is part of the atomic save)."""
    manifest = file_manifest(folder, skip=(BEST_MANIFEST,))
    (folder / BEST_MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def _listed(folder: Path) -> set[str] | None:
    """The files embtune's records list for ``folder``, or None when it has no record."""
    try:
        if (folder / TRAINER_STATE_FILE).is_file():
            state = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
            files = state.get(MANIFEST_KEY) if isinstance(state, dict) else None
            return None if files is None else {*files, TRAINER_STATE_FILE}
        if (folder / BEST_MANIFEST).is_file():
            files = json.loads((folder / BEST_MANIFEST).read_text(encoding="utf-8"))
            return {*files, BEST_MANIFEST}
    except (OSError, ValueError, TypeError):
        return None
    return None


def _remove_saved_files(folder: Path, kept: list[str]) -> None:
    """Remove the files of a saved folder that embtune wrote; the others go to ``kept``."""
    listed = _listed(folder)
    for path in sorted((p for p in folder.rglob("*") if p.is_file()), reverse=True):
        name = path.relative_to(folder).as_posix()
        ours = name in listed if listed is not None else bool(_SAVED_NAMES.fullmatch(name))
        if ours:
            path.unlink()
        else:
            kept.append(f"{folder.name}/{name}")
    _remove_empty_folders(folder)


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _remove_events(folder: Path, kept: list[str]) -> None:
    """TensorBoard's event files, and the hparams.yml accelerate writes beside them."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith("events.out.tfevents.") or path.name == "hparams.yml":
            path.unlink()
        else:
            kept.append(f"{folder.name}/{path.relative_to(folder).as_posix()}")
    _remove_empty_folders(folder)


def clear_previous_run(out: Path) -> tuple[list[str], list[str]]:
    """Remove a previous run's checkpoints, best model, events and state from ``out``.

    Returns (what was removed, files kept because embtune did not write them). A
    ``checkpoint-N`` without a trainer_state.json is not a checkpoint embtune wrote (its saves
    are renamed into place complete) and is left alone.
    """
    removed: list[str] = []
    kept: list[str] = []
    for path in sorted(out.iterdir()):
        name = path.name
        if LEFTOVER_NAME.fullmatch(name) and path.is_dir():
            shutil.rmtree(path)  # an interrupted save's own temporary folder
        elif path.is_dir() and (
            (_CHECKPOINT.fullmatch(name) and (path / TRAINER_STATE_FILE).is_file())
            or name in (BEST_DIR, INTERPOLATED_DIR, MERGED_DIR)
        ):
            _remove_saved_files(path, kept)
        elif name == TENSORBOARD_DIR and path.is_dir():
            _remove_events(path, kept)
        elif name in _RUN_FILES and path.is_file():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed, kept
