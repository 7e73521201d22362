"""Memory of a long run: one contiguous block for state resident between rounds (optimizer state, adapters).

A LoRA adapter is hundreds of 36-100 KB tensors, and AdamW adds two more per parameter. Stored one by one, every
client's state is thousands of small blocks in the allocator's heap, interleaved with the transient buffers of the
next client's round; the holes they leave keep peak memory growing faster than the state itself
(``benchmarks/memory.py``). ``pack`` copies the tensors of a state into one buffer per dtype and device and returns
the same structure holding views of it: one allocation per client, freed whole. ``trim_heap`` hands the heap's
free pages back to the OS between clients, so the holes that remain do not count twice.
"""

from __future__ import annotations

import copy
import ctypes
import functools
from typing import Any

import torch
from torch import Tensor


def _map(obj: Any, fn: Any, path: tuple = ()) -> Any:
    """``obj`` with ``fn(path, tensor)`` applied to every tensor in its nested dicts, lists and tuples (``path``: the
    keys and indices that lead to it); other leaves kept."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn, (*path, i)) for i, v in enumerate(obj))
    return obj


def _leaves(obj: Any) -> dict[tuple, Tensor]:
    """Every tensor of ``obj`` by its path, in ``_map``'s order."""
    out: dict[tuple, Tensor] = {}
    _map(obj, out.__setitem__)
    return out


def _same_tensor_layout(a: dict[tuple, Tensor], b: dict[tuple, Tensor]) -> bool:
    """Whether two ``_leaves`` have the same paths, in order, and the same shapes, dtypes and devices."""
    return list(a) == list(b) and all(
        t.shape == u.shape and t.dtype == u.dtype and t.device == u.device for t, u in zip(a.values(), b.values())
    )


@torch.no_grad()
def pack(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists and tuples) whose tensors are disjoint views of one buffer per
    (dtype, device); non-tensor leaves are kept as they are. The views are detached and contiguous."""
    tensors: dict[int, Tensor] = {}  # by id: a tensor referenced twice is stored once
    _map(obj, lambda _, t: tensors.setdefault(id(t), t))
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors.values():
        groups.setdefault((t.dtype, t.device), []).append(t)
    views: dict[int, Tensor] = {}
    for (dtype, device), members in groups.items():
        buffer = torch.empty(sum(t.numel() for t in members), dtype=dtype, device=device)
        flat = buffer.split([t.numel() for t in members])
        shaped = [view.view(t.shape) for view, t in zip(flat, members)]
        torch._foreach_copy_(shaped, [t.detach() for t in members])  # one call, not one per tensor
        views.update({id(t): view for t, view in zip(members, shaped)})
    return _map(obj, lambda _, t: views[id(t)])


def _exclusive(tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` (distinct objects) and their view bases are all that reference their storages, so nothing
    else (a slice someone kept, say) could see a write into them."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    known = {id(t): t for t in tensors}
    known.update({id(t._base): t._base for t in tensors if t._base is not None})  # a view keeps its base alive
    counts: dict[int, int] = {}
    storages: dict[int, Any] = {}
    for t in known.values():
        storage = t.untyped_storage()
        counts[storage.data_ptr()] = counts.get(storage.data_ptr(), 0) + 1
        storages[storage.data_ptr()] = storage
    # Each tensor holds one reference to its storage; the storage handle taken here holds one more.
    return all(use_count(storages[ptr]._cdata) == n + 1 for ptr, n in counts.items())


@torch.no_grad()
def pack_into(obj: Any, block: Any) -> Any:
    """``obj`` copied into the tensors of ``block``, a packed copy of an earlier ``obj`` of the same layout, in place.

    A swap-out that writes into the pages of the client's previous state neither maps fresh memory (faulted in on
    first write) nor holds two states of a client at once. Falls back to ``pack(obj)`` when the layouts differ or when
    anything else holds a view of ``block``'s storage. A caller that keeps ``block`` itself (not just views of it)
    must not call this: the write is visible through every reference to ``block``.
    """
    new, old = _leaves(obj), _leaves(block)
    distinct = list({id(u): u for u in old.values()}.values())
    if not _same_tensor_layout(new, old) or not distinct or not _exclusive(distinct):
        return pack(obj)
    pairs = {id(u): (u, t) for t, u in zip(new.values(), old.values())}
    torch._foreach_copy_([u for u, _ in pairs.values()], [t.detach() for _, t in pairs.values()])
    return _map(obj, lambda path, _: old[path])


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op where there is none).

    Takes milliseconds; called between clients, not between steps.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _same_layout(live: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Same parameter groups and the same state tensors, and nothing but tensors in the state."""
    only_tensors = all(isinstance(v, Tensor) for d in (live, stored) for s in d["state"].values() for v in s.values())
    return (
        only_tensors
        and len(live["param_groups"]) == len(stored["param_groups"])
        and _same_tensor_layout(_leaves(live["state"]), _leaves(stored["state"]))
    )


@torch.no_grad()
def load_optimizer_state(optimizer: torch.optim.Optimizer, stored: dict[str, Any]) -> None:
    """Swap ``stored`` (an optimizer state dict) into ``optimizer`` without aliasing it, so it is never mutated.

    When the optimizer already holds tensors of the same layout (every swap after a client's first round), the values
    are copied into them: no allocation, no fresh pages. Otherwise it loads a deep copy.
    """
    live = optimizer.state_dict()
    if not stored["state"] or not _same_layout(live, stored):
        optimizer.load_state_dict(copy.deepcopy(stored))
        return
    torch._foreach_copy_(list(_leaves(live["state"]).values()), list(_leaves(stored["state"]).values()))
    for group, saved in zip(optimizer.param_groups, stored["param_groups"]):
        group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
