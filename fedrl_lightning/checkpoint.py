"""Atomic, verifiable round checkpoints, written and read through Fabric's ``save``/``load`` of stateful objects.

Each round is saved as a directory ``round-NNNNNN/`` holding ``state.pt`` (``fabric.save`` of the stateful objects
given: their ``state_dict()``, written by rank 0) and, written last, ``manifest.json`` with the round and the
SHA-256 of ``state.pt``. The directory is assembled under a temporary name, every file is fsynced, then it is
renamed into place and the parent directory is fsynced. A directory without a manifest or whose hash does not match
is torn: ``latest_valid`` skips it and falls back to the previous round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import TorchCheckpointIO

log = logging.getLogger(__name__)
VERSION = 3
_PREFIX = "round-"


class StreamingCheckpointIO(TorchCheckpointIO):
    """Fabric's checkpoint I/O, writing ``torch.save`` straight to the file.

    Lightning's default serializes the whole checkpoint into memory first (twice over: the buffer and its bytes)
    to make the write atomic; a federation's checkpoint holds every client's state, so that would double peak memory
    for a moment every round. ``save`` below makes the round atomic itself (temporary directory, fsync, rename).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("StreamingCheckpointIO takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)


def fabric(**kwargs: Any) -> Fabric:
    """A Fabric whose ``save`` streams checkpoints to disk (``StreamingCheckpointIO``); ``kwargs`` go to ``Fabric``."""
    return Fabric(plugins=[StreamingCheckpointIO()], **kwargs)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_path(directory: Path, round_idx: int) -> Path:
    """Where round ``round_idx``'s checkpoint lives under ``directory``."""
    return directory / f"{_PREFIX}{round_idx:06d}"


def save(
    directory: Path,
    round_idx: int,
    fabric: Fabric,
    state: dict[str, Any],
    prune: list[Path] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (stateful objects and plain values) as round ``round_idx`` atomically, then delete the
    checkpoints listed in ``prune`` (only ever ones this run wrote). ``meta`` (JSON) goes into the manifest. Every
    rank calls it (``fabric.save`` synchronises them); rank 0 writes. Returns the directory.

    Raises:
        OSError: the disk is full or the directory unwritable (the temporary directory is removed; nothing else
            changes).
    """
    final = round_path(directory, round_idx)
    tmp = directory / f".tmp-{_PREFIX}{round_idx:06d}"
    writer = fabric.is_global_zero
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        fabric.save(tmp / "state.pt", state)
        if writer:
            _fsync(tmp / "state.pt")
            manifest = {"version": VERSION, "round": round_idx, "sha256": _sha256(tmp / "state.pt"), **(meta or {})}
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            _fsync(tmp / "manifest.json")
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as RuntimeError("... iostream error")
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{err}; is the disk full or the directory unwritable?"
        raise OSError(f"could not write checkpoint {final} ({reason})") from err
    if writer:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(directory)
        for old in prune or []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()
    return final


def manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest (round, hash, and what the run stored with it, e.g. its settings)."""
    return json.loads((path / "manifest.json").read_text())


def is_valid(path: Path) -> bool:
    """A complete checkpoint: manifest present, readable, of this version, and matching the state's hash."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest["version"] == VERSION and manifest["sha256"] == _sha256(path / "state.pt")
    except (OSError, ValueError, KeyError):
        return False


def latest_valid(directory: Path) -> Path | None:
    """The newest valid checkpoint under ``directory``; torn ones are reported and skipped."""
    for path in sorted(directory.glob(f"{_PREFIX}*"), reverse=True):
        if is_valid(path):
            return path
        log.warning("checkpoint %s is incomplete or corrupt; falling back to an earlier one", path)
    return None


def resolve(ckpt_path: str | None, directory: Path) -> Path | None:
    """``last`` -> the newest valid checkpoint (or None for a fresh run); a path must be a valid checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        return latest_valid(directory)
    path = Path(ckpt_path)
    if not is_valid(path):
        raise FileNotFoundError(f"ckpt_path {ckpt_path!r} is not a complete checkpoint directory (state.pt + manifest)")
    return path


def load(path: Path, fabric: Fabric | None = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore ``state``'s stateful objects in place from the checkpoint at ``path`` (through ``fabric``) and return
    what was not restored; without ``fabric``, the whole checkpoint (memory-mapped, for inspection)."""
    if fabric is None:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False, mmap=True)
    return fabric.load(path / "state.pt", state, weights_only=False)


def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
