"""An output directory belongs to one run: a lock while it runs, and the run's settings stored with its checkpoints.

``RunLock`` holds ``<output_dir>/.lock`` (an advisory ``flock``, released by the kernel even when the process is
killed) and writes the holder's PID into it, so a second run into the same directory fails at once, naming it.
``settings`` flattens a resolved config into dotted keys minus those a resumed run may change (``RESUMABLE``); the
server stores them in each checkpoint's manifest and ``differences`` says what changed before a resume is allowed.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrl_lightning import checkpoint
from fedrl_lightning.errors import RunDirectoryError

RESUMABLE = frozenset(
    {
        "trainer.num_rounds",  # extend a finished run
        "trainer.eval_every",
        "trainer.eval_batch_size",
        "trainer.progress",
        "trainer.callbacks",  # callbacks observe; one added or removed on resume starts fresh or is ignored
        "trainer.output_dir",  # a moved directory
        "trainer.keep_checkpoints",
        "trainer.client_timeout",
        "trainer.round_retries",
        "trainer.save_merged",
        "trainer.client_state_dir",
        "trainer.loggers",  # what is logged, not what is computed
        "trainer.log_every_n_steps",
        "trainer.log_completions_every",
        "ckpt_path",
        "config",
        "seed_everything",
    }
)
"""Settings a resumed run may change: none of them alters what the completed rounds computed."""


def settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as ``{"a.b.c": value}`` without the ``RESUMABLE`` keys (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in RESUMABLE:
            continue
        if isinstance(value, Mapping):
            out.update(settings(value, f"{name}."))
        else:
            out[name] = value
    return out


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One ``key: saved -> current`` line per setting that differs (a key missing on one side shows as <unset>)."""
    keys = sorted(set(saved) | set(current))
    unset = "<unset>"
    return [
        f"{k}: {saved.get(k, unset)!r} -> {current.get(k, unset)!r}"
        for k in keys
        if saved.get(k, unset) != current.get(k, unset)
    ]


def resume_point(checkpoint_dir: Path, ckpt_path: str | None, current: Mapping[str, Any] | None) -> Path | None:
    """The checkpoint a run given ``ckpt_path`` resumes from (None: a fresh start), after checking it may.

    Raises:
        RunDirectoryError: ``ckpt_path`` is None but ``checkpoint_dir`` holds an earlier run's checkpoints, or the
            checkpoint was written with settings other than ``current`` (the message lists them).
    """
    if ckpt_path is None:
        existing = checkpoint.latest_valid(checkpoint_dir)
        if existing is not None:
            raise RunDirectoryError(
                f"{checkpoint_dir} holds the checkpoints of an earlier run (up to {existing.name}); ckpt_path null "
                f"would mix two runs in one directory. Resume it (ckpt_path last) or choose another output_dir"
            )
        return None
    path = checkpoint.resolve(ckpt_path, checkpoint_dir)
    saved = checkpoint.manifest(path).get("settings") if path is not None else None
    changed = differences(saved, current) if saved is not None and current is not None else []
    if changed:
        raise RunDirectoryError(
            f"{path} was written with other settings; a resumed run must keep them:\n  "
            + "\n  ".join(changed)
            + "\nRun with the same settings to resume, or choose another output_dir to start fresh"
        )
    return path


def lineage(checkpoint_dir: Path, path: Path) -> list[Path]:
    """The checkpoints of the run resumed from ``path`` (a valid one): same directory, same settings, not newer,
    valid (prunable). Each manifest is read once; only the other candidates' hashes are checked."""
    if path.parent != checkpoint_dir:
        return []
    last = checkpoint.manifest(path)
    mine = []
    for p in sorted(checkpoint_dir.glob("round-*")):
        try:
            m = checkpoint.manifest(p)
        except (OSError, ValueError):  # no manifest: torn, not ours to prune
            continue
        same = m.get("round", last["round"] + 1) <= last["round"] and m.get("settings") == last.get("settings")
        if same and (p == path or checkpoint.is_valid(p)):
            mine.append(p)
    return mine


class RunLock:
    """``<output_dir>/.lock``, held for the life of a run.

    Raises:
        RunDirectoryError: another live process holds it (its PID is in the message).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"output_dir {self.path.parent} is in use by another run (PID {holder}); wait for it to finish or "
                f"choose another --trainer.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
