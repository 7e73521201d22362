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


def _map(obj: Any, fn: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in its nested dicts, lists and tuples; other leaves kept."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    return obj


@torch.no_grad()
def pack(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists and tuples) whose tensors are disjoint views of one buffer per
    (dtype, device); non-tensor leaves are kept as they are. The views are detached and contiguous."""
    tensors: dict[int, Tensor] = {}  # by id: a tensor referenced twice is stored once
    _map(obj, lambda t: tensors.setdefault(id(t), t))
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors.values():
        groups.setdefault((t.dtype, t.device), []).append(t)
    views: dict[int, Tensor] = {}
    for (dtype, device), members in groups.items():
        buffer = torch.empty(sum(t.numel() for t in members), dtype=dtype, device=device)
        offset = 0
        for t in members:
            view = buffer[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            views[id(t)] = view
            offset += t.numel()
    return _map(obj, lambda t: views[id(t)])


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
    if live["state"].keys() != stored["state"].keys() or len(live["param_groups"]) != len(stored["param_groups"]):
        return False
    for pid, saved in stored["state"].items():
        current = live["state"][pid]
        if current.keys() != saved.keys():
            return False
        for key, value in saved.items():
            now = current[key]
            if not (isinstance(value, Tensor) and isinstance(now, Tensor)):
                return False
            if now.shape != value.shape or now.dtype != value.dtype or now.device != value.device:
                return False
    return True


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
    for pid, saved in stored["state"].items():
        for key, value in saved.items():
            live["state"][pid][key].copy_(value)
    for group, saved in zip(optimizer.param_groups, stored["param_groups"]):
        group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
