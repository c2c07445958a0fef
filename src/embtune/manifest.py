"""Checkpoint integrity: every file of a checkpoint listed with its size and checksum, and the
checks a resume runs before it trusts one.

A checkpoint that was renamed into place is complete, but a disk can still damage it later
(flipped bytes, a truncated copy, a file deleted by hand). Resuming from it would be silently
wrong: a model with NaN weights, or an inexact continuation without its RNG state. So
``save_checkpoint`` records :func:`file_manifest` in trainer_state.json (written last), and a
resume refuses a checkpoint whose files differ (:func:`manifest_problem`). Checkpoints written
before manifests existed get the checks their files allow (:func:`legacy_problem`).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

MANIFEST_KEY = "files"  # trainer_state.json: {relative path: {"bytes": n, "sha256": hex}}
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Size and SHA-256 of every file below ``folder`` (paths relative, "/"-separated)."""
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in skip:
            manifest[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return manifest


def manifest_problem(folder: Path, manifest: dict) -> str | None:
    """The first file of ``folder`` that differs from ``manifest`` and how, or None.

    Sizes are compared for every file before any checksum is computed, so a truncated or
    missing file is found without reading the others.
    """
    if not isinstance(manifest, dict):
        return f"trainer_state.json: '{MANIFEST_KEY}' is not a mapping"
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        expected = entry.get("bytes") if isinstance(entry, dict) else None
        if path.stat().st_size != expected:
            return f"{name}: {path.stat().st_size} bytes, {expected} when saved (truncated?)"
    for name, entry in manifest.items():
        if _sha256(folder / name) != entry.get("sha256"):
            return f"{name}: content differs from when it was saved (checksum)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A truncated or damaged safetensors file: its header must parse and fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "too short for a safetensors file"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "header runs past the end of the file (truncated?)"
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return "header is not valid JSON"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return "tensor data runs past the end of the file (truncated?)"
    return None


def _zip_problem(path: Path) -> str | None:
    """A torch.save file (a zip archive) whose entries fail their CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"damaged ({exc})"
    return f"entry {bad} is damaged" if bad else None


def legacy_problem(folder: Path, required: list[str]) -> str | None:
    """For a checkpoint without a manifest: every required file present and non-empty,
    safetensors headers consistent, torch archives passing their CRC checks."""
    for name in required:
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size == 0:
            return f"{name}: empty"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif zipfile.is_zipfile(path):
            problem = _zip_problem(path)
        else:
            problem = None
        if problem:
            return f"{name}: {problem}"
    return None
