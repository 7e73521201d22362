"""Client states on disk: a thousand clients on one machine, with only the selected ones in memory.

``DiskClientStateBank`` keeps each (kind, dtype) buffer of ``ClientStateBank`` as a file of fixed-width rows
(sparse: a row takes disk space once written) and moves rows with ``pread``/``pwrite``: a round reads and writes
exactly its selected clients' rows, and the process holds no mapping of the files, so its memory does not grow with
the number of registered clients (the page cache is the kernel's, reclaimable).

A checkpoint then cannot copy the bank (56 MB per client for the embedded model). It records the bank's *version*
instead, with the small per-client values (data cursor, RNG, algorithm state) and which rows hold state. Every
checkpoint starts a new version; the first write of a row in a version first appends the row's previous bytes to
that version's undo journal (``undo-<version>.log``, flushed to disk before the row changes). Going back to the
checkpoint of version ``k`` (a resume after a crash, a retried round) replays the journals of the versions after
``k``, newest first. Journals older than the oldest kept checkpoint are deleted; a row that held nothing at the last
checkpoint is never journaled, so a client's first round costs no journal. ``bank.json`` names the bank (a random
id a checkpoint must match) and its version.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrl_lightning import ranks
from fedrl_lightning.client_state import KINDS, ClientStateBank, _Layout

HEADER = "bank.json"
log = logging.getLogger(__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _pread(fd: int, out: Tensor, offset: int) -> Tensor:
    view, got = _bytes(out), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:  # past the end of a sparse file's written part: zeros
            view[got:] = bytes(len(view) - got)
            break
        got += n
    return out


class DiskClientStateBank(ClientStateBank):
    """A ``ClientStateBank`` whose rows live in files under ``directory``.

    Args:
        client_ids: the clients (rows, in this order).
        directory: where the row files, undo journals and ``bank.json`` live (created if needed). A new run
            empties it on its first write; a resumed run reuses it.
        keep_versions: how many checkpoints' versions stay restorable (the run's ``keep_checkpoints``).
        uid: the id a new bank takes (default random): Fabric ranks each keep a replica of the bank under one id, so
            that the checkpoint rank 0 writes names every rank's.
    """

    def __init__(
        self, client_ids: Iterable[int], directory: str | Path, keep_versions: int = 2, uid: str | None = None
    ) -> None:
        super().__init__(client_ids)
        self.directory, self.keep_versions, self._new_uid = Path(directory), keep_versions, uid
        self.uid: str | None = None  # None until opened: fresh on a first write, reused by a resume
        self.version = 0  # the last checkpoint's; writes since belong to version + 1
        self._fds: dict[tuple[str, torch.dtype], int] = {}
        self._journal: Any = None
        self._journaled: set[tuple[str, int]] = set()  # rows whose before-image this version holds already
        self._present_then: dict[str, Tensor] = {k: v.clone() for k, v in self._present.items()}

    # -- files ---------------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _journal_path(self, version: int) -> Path:
        return self._path(f"undo-{version:06d}.log")

    def _open(self, fresh: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if fresh:
            if self._path(HEADER).is_file():  # a run's own crash before its first checkpoint, or another run's bank
                log.warning("%s held a client-state bank already: a new run starts it over", self.directory)
            for old in [*self.directory.glob("*.bin"), *self.directory.glob("undo-*.log")]:
                old.unlink()
            self.uid, self.version = self._new_uid or uuid.uuid4().hex, 0
            self._write_header()
            return
        try:
            header = json.loads(self._path(HEADER).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self._path(HEADER)} is missing or unreadable: no client-state bank to resume") from err
        self.uid, self.version = header["uid"], header["version"]

    def _write_header(self) -> None:
        tmp = self._path(HEADER + ".tmp")
        tmp.write_text(json.dumps({"uid": self.uid, "version": self.version, "clients": len(self.rows)}))
        os.replace(tmp, self._path(HEADER))

    def _allocate(self, kind: str, layout: _Layout) -> None:
        if self.uid is None:
            self._open(fresh=True)
        for dtype, width in layout.widths.items():
            path = self._path(f"{kind}-{_dtype_name(dtype)}.bin")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            size = len(self.rows) * width * dtype.itemsize
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse: no disk used until a row is written
            self._fds[kind, dtype] = fd
        self._layouts[kind] = layout

    def _offset(self, kind: str, row: int, dtype: torch.dtype) -> int:
        return row * self._layouts[kind].widths[dtype] * dtype.itemsize

    def _store(self, kind: str, row: int, dtype: torch.dtype, parts: list[Tensor]) -> None:
        self._before_write(kind, row)
        flat = torch.cat([p.detach().reshape(-1).cpu() for p in parts])
        _pwrite(self._fds[kind, dtype], _bytes(flat), self._offset(kind, row, dtype))

    def _load(self, kind: str, row: int) -> dict[torch.dtype, Tensor]:
        return {
            dtype: _pread(self._fds[kind, dtype], torch.empty(width, dtype=dtype), self._offset(kind, row, dtype))
            for dtype, width in self._layouts[kind].widths.items()
        }

    def nbytes(self) -> int:
        """Bytes the row files take on disk (written rows only)."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds.values())

    # -- the undo journal ----------------------------------------------------------------------------------------

    def _before_write(self, kind: str, row: int) -> None:
        """Journal the row's bytes as of the last checkpoint, once per version, before it first changes."""
        if self.version == 0 or (kind, row) in self._journaled or not bool(self._present_then[kind][row]):
            return  # before any checkpoint, already journaled, or empty at the checkpoint: nothing to restore
        if self._journal is None:
            self._journal = open(self._journal_path(self.version + 1), "ab")  # noqa: SIM115 (lives across writes)
        for dtype, data in self._load(kind, row).items():
            entry = {"kind": kind, "row": row, "dtype": _dtype_name(dtype), "nbytes": data.numel() * dtype.itemsize}
            self._journal.write(json.dumps(entry).encode() + b"\n")
            self._journal.write(_bytes(data))
        self._journal.flush()
        os.fsync(self._journal.fileno())  # the before-image is on disk before the row changes
        self._journaled.add((kind, row))

    def _undo(self, version: int, rows: set[int] | None) -> None:
        """Put back the before-images journaled in ``version`` (of ``rows`` only, if given). A torn last entry (a
        crash while journaling) is skipped: its row was not written yet."""
        with open(self._journal_path(version), "rb") as f:
            while line := f.readline():
                try:
                    entry = json.loads(line)
                except ValueError:
                    return
                data = f.read(entry["nbytes"])
                if len(data) < entry["nbytes"]:
                    return
                if rows is None or entry["row"] in rows:
                    kind, row, dtype = entry["kind"], entry["row"], getattr(torch, entry["dtype"])
                    _pwrite(self._fds[kind, dtype], memoryview(data), self._offset(kind, row, dtype))

    def _new_version(self) -> None:
        """Everything written so far is version ``self.version``; later writes journal against it."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._journal_path(self.version + 1).unlink(missing_ok=True)
        self._journal_path(self.version + 1).touch()  # present, even empty: a missing journal means pruned
        self._journaled.clear()
        self._present_then = {k: v.clone() for k, v in self._present.items()}
        for old in self.directory.glob("undo-*.log"):
            if int(old.stem.removeprefix("undo-")) <= self.version - self.keep_versions + 1:
                old.unlink()  # older than the oldest checkpoint kept

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The bank's version and small values (not its rows) for a checkpoint; starts the next version."""
        if self.uid is None:
            self._open(fresh=True)
        for fd in self._fds.values():
            os.fdatasync(fd)
        self.version += 1
        self._write_header()
        self._new_version()
        return {
            "clients": list(self.rows),
            "layouts": {k: {"entries": v.entries, "widths": v.widths} for k, v in self._layouts.items()},
            "disk": {"directory": str(self.directory.resolve()), "uid": self.uid, "version": self.version},
            "present": {k: v.clone() for k, v in self._present.items()},
            "meta": self._meta,
        }

    def load_state_dict(self, state: Mapping[str, Any], only: Iterable[int] | None = None) -> None:
        """Back to a checkpoint's version (``only``: just those clients' rows, for a retried round). A checkpoint
        of a RAM bank is copied in.

        Raises:
            ValueError: the checkpoint belongs to another bank, or its version is no longer restorable.
        """
        disk = state.get("disk")
        if disk is None:
            return super().load_state_dict(state, only)
        if self.uid is None:
            self._open(fresh=False)
        if disk["uid"] != self.uid:
            raise ValueError(
                f"the checkpoint's client states are the bank in {disk['directory']}, not the one in "
                f"{self.directory}: resume with trainer.client_state_dir set to {disk['directory']}"
            )
        target = disk["version"]
        gone = [v for v in range(target + 1, self.version + 1) if not self._journal_path(v).exists()]
        if target > self.version or gone:
            raise ValueError(
                f"the client-state bank in {self.directory} is at version {self.version} and cannot go back to the "
                f"checkpoint's version {target} (its undo journals are pruned): resume from a newer checkpoint"
            )
        saved_rows = self._check_layouts(state)
        rows = None if only is None else {self.rows[c] for c in only if c in self.rows}
        if self._journal is not None:
            self._journal.flush()
        for version in range(self.version + 1, target, -1):  # newest first
            if self._journal_path(version).exists():
                self._undo(version, rows)
        wanted = set(saved_rows) if only is None else set(only) & set(saved_rows)
        self._restore_small(state, saved_rows, wanted, only)
        if only is None:  # the whole bank is at the target version: later versions are gone
            for version in range(target + 1, self.version + 2):
                self._journal_path(version).unlink(missing_ok=True)
            self.version = target
            self._write_header()
            self._new_version()

    def close(self) -> None:
        """Close the files (the bank is unusable afterwards)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_bank(
    client_ids: list[int], directory: str | Path | None, keep_versions: int = 2, rank: int = 0, world_size: int = 1
) -> ClientStateBank:
    """The run's bank: in RAM without ``directory``, else on disk there (with several Fabric ranks each keeps a
    replica of every client's state in its own ``rank<r>`` subdirectory, all under one bank id; a collective call).
    """
    if directory is None:
        return ClientStateBank(client_ids)
    uid = None
    if world_size > 1:
        directory = Path(directory) / f"rank{rank}"
        uid = ranks.all_gather_objects(uuid.uuid4().hex, world_size)[0]
    return DiskClientStateBank(client_ids, directory, keep_versions, uid)


__all__ = ["KINDS", "DiskClientStateBank", "open_bank"]
