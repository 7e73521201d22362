"""Every client's private state between rounds: rows of preallocated buffers, so a swap is an index copy.

A client keeps, between its rounds, its optimizer state (AdamW moments), its own adapter when nothing overwrites it
(local-only training), and a few small values: its data cursor, its RNG state and algorithm state (a SCAFFOLD
control variate, an FGRPO baseline, FedMOA's objective weights). ``ClientStateBank`` holds the tensors of each kind
as one row per client of one flat buffer per dtype, allocated once for every client when the kind's layout is first
seen; a swap-out writes the client's row in place, a swap-in copies it back into the live tensors. Memory is then
the buffers, never a heap of hundreds of small per-client tensors, and nothing is held twice. For federations with
more clients than RAM, ``DiskClientStateBank`` (``disk_bank``) keeps the rows in files instead, with only the
selected clients' rows in memory.

``ClientState`` is one client's row in portable form: what a checkpoint, a Flower client's disk, or another Fabric
rank receives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    """

    def __init__(self, client_ids: Iterable[int]) -> None:
        self.rows = {cid: i for i, cid in enumerate(client_ids)}
        self._layouts: dict[str, _Layout] = {}
        self._buffers: dict[str, dict[torch.dtype, Tensor]] = {}
        self._present: dict[str, Tensor] = {kind: torch.zeros(len(self.rows), dtype=torch.bool) for kind in KINDS}
        self._meta: dict[int, dict[str, Any]] = {}

    def __contains__(self, cid: int) -> bool:
        return cid in self._meta

    # -- storage: what a disk bank replaces ---------------------------------------------------------------------

    def _allocate(self, kind: str, layout: _Layout) -> None:
        try:  # pages are touched only by the rows written, but the whole buffer must be addressable
            buffers = {d: torch.empty((len(self.rows), width), dtype=d) for d, width in layout.widths.items()}
        except RuntimeError as err:
            size = len(self.rows) * sum(w * d.itemsize for d, w in layout.widths.items())
            raise ValueError(  # a setting to change, like any bad input
                f"the clients' {kind} states need {size / 1e9:.1f} GB of RAM for {len(self.rows)} clients, more than "
                "this machine can reserve: set trainer.client_state_dir to keep them on disk"
            ) from err
        self._layouts[kind], self._buffers[kind] = layout, buffers

    def _store(self, kind: str, row: int, dtype: torch.dtype, parts: list[Tensor]) -> None:
        """Row ``row`` of ``kind``'s ``dtype`` buffer := the concatenation of ``parts``."""
        buffer = self._buffers[kind][dtype]
        torch.cat([p.to(buffer.device) for p in parts], out=buffer[row])

    def _load(self, kind: str, row: int) -> dict[torch.dtype, Tensor]:
        """Row ``row`` of each of ``kind``'s buffers (views)."""
        return {dtype: buffer[row] for dtype, buffer in self._buffers[kind].items()}

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
        for dtype in layout.widths:
            parts = [t.detach().reshape(-1) for k, t in tensors.items() if layout.entries[k][0] == dtype]
            self._store(kind, row, dtype, parts)
        self._present[kind][row] = True

    def read(self, kind: str, cid: int) -> dict[str, Tensor] | None:
        """Client ``cid``'s ``kind`` tensors as views of its row (no copy; a disk bank reads a copy), or None if it
        has none."""
        row = self._row(cid)
        if not bool(self._present[kind][row]):
            return None
        rows = self._load(kind, row)
        return {
            name: rows[dtype][offset : offset + shape.numel()].view(shape)
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
        if "buffers" not in state:
            raise ValueError(
                f"the checkpoint's client states live in the directory {state.get('disk', {}).get('directory')}: "
                "resume with trainer.client_state_dir set to it"
            )
        saved_rows = self._check_layouts(state)
        wanted = set(saved_rows) if only is None else set(only) & set(saved_rows)
        for cid in wanted:
            for kind, buffers in state["buffers"].items():
                if bool(state["present"][kind][saved_rows[cid]]):  # an empty row's bytes mean nothing
                    for dtype, buffer in buffers.items():
                        self._store(kind, self.rows[cid], dtype, [buffer[saved_rows[cid]]])
        self._restore_small(state, saved_rows, wanted, only)

    def _check_layouts(self, state: Mapping[str, Any]) -> dict[int, int]:
        """The checkpoint's rows by client, once its clients and layouts are known to fit this bank (allocated
        where this bank has none yet)."""
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
        return saved_rows

    def _restore_small(
        self, state: Mapping[str, Any], saved_rows: dict[int, int], wanted: set[int], only: Iterable[int] | None
    ) -> None:
        """The presence flags and small values of the ``wanted`` clients from ``state``; ``only``'s clients the
        checkpoint does not hold become never stored."""
        if only is not None:
            self.forget(set(only) - set(saved_rows))
        for cid in wanted:
            src, dst = saved_rows[cid], self.rows[cid]
            for kind in KINDS:
                self._present[kind][dst] = state["present"][kind][src]
            if cid in state["meta"]:
                self._meta[cid] = copy.deepcopy(state["meta"][cid])
            else:
                self._meta.pop(cid, None)
