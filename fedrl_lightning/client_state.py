"""Every client's private state between rounds: rows of preallocated buffers, so a swap is an index copy.

A client keeps, between its rounds, its optimizer state (AdamW moments), its own adapter when nothing overwrites it
(local-only training), and a few small values: its data cursor, its RNG state and algorithm state (a SCAFFOLD
control variate, an FGRPO baseline, FedMOA's objective weights). ``ClientStateBank`` holds the tensors of each kind
as one row per client of one flat buffer per dtype, allocated once for every client when the kind's layout is first
seen; a swap-out writes the client's row in place, a swap-in copies it back into the live tensors. Memory is then
the buffers, never a heap of hundreds of small per-client tensors, and nothing is held twice. With ``directory``
set, each buffer is a memory-mapped file there (``torch.from_file``): the operating system keeps in RAM only the
rows being used, for federations with more clients than RAM.

``ClientState`` is one client's row in portable form: what a checkpoint, a Flower client's disk, or another Fabric
rank receives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

KINDS = ("optimizer", "adapter")
"""The tensor kinds a bank holds per client."""


@dataclass
class ClientState:
    """One client's state between rounds, in portable form.

    Attributes:
        sampler: the data cursor (``ClientSampler.state_dict()``).
        rng: the torch RNG state the client's next round starts from.
        optimizer: the optimizer's state tensors by ``"<param index>.<name>"`` (``optimizer_tensors``); None before
            the client's first round.
        optimizer_groups: the optimizer's hyperparameters per parameter group (learning rate, ...).
        adapter: the client's own adapter when it keeps one (local-only training), else None.
        extra: algorithm state (``module``: the module's client state; aggregator state such as ``scaffold_c``).
    """

    sampler: dict[str, int]
    rng: Tensor
    optimizer: dict[str, Tensor] | None = None
    optimizer_groups: list[dict[str, Any]] | None = None
    adapter: dict[str, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- optimizer state as named tensors ------------------------------------------------------------------------------


def _params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(optimizer: Optimizer) -> dict[str, Tensor]:
    """The optimizer's state tensors by ``"<param index>.<name>"``, in parameter order (the live tensors, no copy).

    Raises:
        TypeError: a state entry is not a tensor (such an optimizer cannot be swapped through a bank).
    """
    out: dict[str, Tensor] = {}
    for i, p in enumerate(_params(optimizer)):
        for name, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {name!r} of parameter {i} is a {type(value).__name__}, not a tensor")
            out[f"{i}.{name}"] = value
    return out


def optimizer_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The hyperparameters of each parameter group (everything but the parameters)."""
    return [{k: copy.deepcopy(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@torch.no_grad()
def load_optimizer(optimizer: Optimizer, tensors: Mapping[str, Tensor] | None, groups: list[dict] | None) -> None:
    """Put a stored state into ``optimizer``: copied into its live tensors where they exist (no allocation after a
    client's first swap), cloned where they do not; ``tensors=None`` leaves it fresh (state created on first step)."""
    if groups is not None:
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(copy.deepcopy(saved))
    if tensors is None:
        optimizer.state.clear()
        return
    params = _params(optimizer)
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slot = optimizer.state[params[int(index)]]
        live = slot.get(name)
        if live is not None and live.shape == value.shape and live.dtype == value.dtype:
            live.copy_(value)
        else:
            slot[name] = value.clone()


# -- the bank --------------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where each named tensor of a kind lies in a row: its dtype's buffer, offset, shape."""

    entries: dict[str, tuple[torch.dtype, int, torch.Size]]
    widths: dict[torch.dtype, int]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> _Layout:
        entries, widths = {}, {}
        for name, t in tensors.items():
            entries[name] = (t.dtype, widths.get(t.dtype, 0), t.shape)
            widths[t.dtype] = widths.get(t.dtype, 0) + t.numel()
        return cls(entries, widths)

    def matches(self, tensors: Mapping[str, Tensor]) -> bool:
        return list(tensors) == list(self.entries) and all(
            t.dtype == self.entries[k][0] and t.shape == self.entries[k][2] for k, t in tensors.items()
        )


class ClientStateBank:
    """Every client's state, one row per client in a flat buffer per (kind, dtype), plus small per-client values.

    Args:
        client_ids: the clients (rows, in this order).
        directory: None keeps the buffers in RAM; a directory makes each a memory-mapped file there.
    """

    def __init__(self, client_ids: Iterable[int], directory: str | Path | None = None) -> None:
        self.rows = {cid: i for i, cid in enumerate(client_ids)}
        self.directory = Path(directory) if directory is not None else None
        self._layouts: dict[str, _Layout] = {}
        self._buffers: dict[str, dict[torch.dtype, Tensor]] = {}
        self._present: dict[str, Tensor] = {kind: torch.zeros(len(self.rows), dtype=torch.bool) for kind in KINDS}
        self._meta: dict[int, dict[str, Any]] = {}

    def __contains__(self, cid: int) -> bool:
        return cid in self._meta

    def _allocate(self, kind: str, layout: _Layout) -> None:
        buffers = {}
        for dtype, width in layout.widths.items():
            shape = (len(self.rows), width)
            if self.directory is None:
                buffers[dtype] = torch.empty(shape, dtype=dtype)  # pages are touched only by the rows written
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"{kind}-{str(dtype).removeprefix('torch.')}.bin"
                path.unlink(missing_ok=True)
                flat = torch.from_file(str(path), shared=True, size=shape[0] * shape[1], dtype=dtype)
                buffers[dtype] = flat.view(shape)
        self._layouts[kind], self._buffers[kind] = layout, buffers

    def _row(self, cid: int) -> int:
        if cid not in self.rows:
            raise KeyError(f"client {cid} is not in this bank (clients {sorted(self.rows)[:8]}...)")
        return self.rows[cid]

    @torch.no_grad()
    def write(self, kind: str, cid: int, tensors: Mapping[str, Tensor] | None) -> None:
        """Store ``tensors`` as client ``cid``'s ``kind`` row (copied in place); None marks the row empty.

        Raises:
            ValueError: the tensors' names, shapes or dtypes differ from what this kind held before.
        """
        row = self._row(cid)
        if tensors is None:
            self._present[kind][row] = False
            return
        if kind not in self._layouts:
            self._allocate(kind, _Layout.of(tensors))
        layout = self._layouts[kind]
        if not layout.matches(tensors):
            raise ValueError(f"client {cid}'s {kind} state has another layout than the bank's (names/shapes/dtypes)")
        for dtype, buffer in self._buffers[kind].items():
            parts = [t.detach().reshape(-1) for k, t in tensors.items() if layout.entries[k][0] == dtype]
            torch.cat([p.to(buffer.device) for p in parts], out=buffer[row])
        self._present[kind][row] = True

    def read(self, kind: str, cid: int) -> dict[str, Tensor] | None:
        """Client ``cid``'s ``kind`` tensors as views of its row (no copy), or None if it has none."""
        row = self._row(cid)
        if not bool(self._present[kind][row]):
            return None
        buffers = self._buffers[kind]
        return {
            name: buffers[dtype][row, offset : offset + shape.numel()].view(shape)
            for name, (dtype, offset, shape) in self._layouts[kind].entries.items()
        }

    def get(self, cid: int, clone: bool = False) -> ClientState | None:
        """Client ``cid``'s state (views of its rows, or copies with ``clone``); None if it was never stored."""
        if cid not in self._meta:
            return None
        meta = self._meta[cid]
        tensors = {kind: self.read(kind, cid) for kind in KINDS}
        if clone:
            tensors = {k: {n: t.clone() for n, t in v.items()} if v is not None else None for k, v in tensors.items()}
            meta = copy.deepcopy(meta)
        return ClientState(
            sampler=meta["sampler"],
            rng=meta["rng"],
            optimizer=tensors["optimizer"],
            optimizer_groups=meta.get("optimizer_groups"),
            adapter=tensors["adapter"],
            extra=meta["extra"],
        )

    def put(self, cid: int, state: ClientState) -> None:
        """Store a whole ``ClientState`` for client ``cid`` (its tensors copied into the rows)."""
        self.write("optimizer", cid, state.optimizer)
        self.write("adapter", cid, state.adapter)
        self.set_meta(cid, state.sampler, state.rng, state.extra, state.optimizer_groups)

    def set_meta(
        self, cid: int, sampler: dict[str, int], rng: Tensor, extra: dict[str, Any], groups: list[dict] | None = None
    ) -> None:
        """Client ``cid``'s small values: data cursor, RNG state, algorithm state, optimizer hyperparameters."""
        self._row(cid)
        self._meta[cid] = {"sampler": sampler, "rng": rng, "extra": extra, "optimizer_groups": groups}

    def forget(self, cids: Iterable[int]) -> None:
        """Back to never stored, for these clients."""
        for cid in cids:
            self._meta.pop(cid, None)
            for kind in KINDS:
                self._present[kind][self._row(cid)] = False

    def nbytes(self) -> int:
        """Bytes of the tensor buffers (all rows, written or not)."""
        return sum(b.numel() * b.element_size() for kind in self._buffers.values() for b in kind.values())

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole bank (the buffers themselves, not copies) for a checkpoint."""
        return {
            "clients": list(self.rows),
            "layouts": {k: {"entries": v.entries, "widths": v.widths} for k, v in self._layouts.items()},
            "buffers": self._buffers,
            "present": self._present,
            "meta": self._meta,
        }

    def load_state_dict(self, state: Mapping[str, Any], only: Iterable[int] | None = None) -> None:
        """Restore a ``state_dict()`` (of the same clients); with ``only``, just those clients' rows.

        Raises:
            ValueError: the checkpoint holds clients this bank does not.
        """
        saved_rows = {cid: i for i, cid in enumerate(state["clients"])}
        unknown = set(saved_rows) - set(self.rows)
        if unknown:
            raise ValueError(f"the checkpoint holds clients {sorted(unknown)[:8]} that are not in this run's data")
        for kind, spec in state["layouts"].items():
            layout = _Layout(dict(spec["entries"]), dict(spec["widths"]))
            if kind not in self._layouts:
                self._allocate(kind, layout)
            elif self._layouts[kind].entries != layout.entries:
                raise ValueError(f"the checkpoint's {kind} state has another layout than this run's")
        wanted = set(saved_rows) if only is None else set(only) & set(saved_rows)
        if only is not None:
            self.forget(set(only) - set(saved_rows))
        for cid in wanted:
            src, dst = saved_rows[cid], self.rows[cid]
            for kind, buffers in state["buffers"].items():
                for dtype, buffer in buffers.items():
                    self._buffers[kind][dtype][dst].copy_(buffer[src])
            for kind in KINDS:
                self._present[kind][dst] = state["present"][kind][src]
            if cid in state["meta"]:
                self._meta[cid] = copy.deepcopy(state["meta"][cid])
            else:
                self._meta.pop(cid, None)
