"""Clients sharded over Fabric ranks: each rank trains its share of a round's clients, updates are gathered.

Ranks are independent trainers, not data-parallel replicas: no gradient is all-reduced (each rank trains other
clients), so the module is not wrapped in ``DistributedDataParallel``. After a round's client work, every rank
holds every update in the round's client order and aggregates them itself (float64 on CPU, the same on every
rank), so the global adapter, the aggregator's state and the callbacks' state stay identical across ranks; the
changed client states are gathered too, so any rank can run any client next round and rank 0 checkpoints them all.
A client's round depends only on its own state (RNG, sampler, optimizer), hence the result does not depend on the
number of ranks for the same seed.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.strategies import DDPStrategy
from torch.nn import Module

T = TypeVar("T")


class ClientParallelStrategy(DDPStrategy):
    """Fabric's DDP launcher and process group (gloo on CPU), without the DDP module wrapper.

    Args:
        process_group_backend: ``gloo`` (CPU) or ``nccl``; None = Fabric's choice for the accelerator.
        kwargs: passed to ``DDPStrategy`` (e.g. ``timeout``, ``start_method``).
    """

    def __init__(self, process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(process_group_backend=process_group_backend, **kwargs)

    def setup_module(self, module: Module) -> Module:
        """The module as it is: ranks train different clients, so their gradients must not be averaged."""
        return module


def shard(client_ids: list[int], rank: int, world_size: int) -> list[int]:
    """The clients rank ``rank`` runs: every ``world_size``-th of the round's clients, starting at ``rank``."""
    return client_ids[rank::world_size]


def all_gather_objects(obj: T, world_size: int) -> list[T]:
    """Every rank's ``obj`` (picklable, tensors on CPU), in rank order; ``[obj]`` in a single process."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def in_client_order(client_ids: list[int], per_rank: list[dict[int, T]]) -> list[tuple[int, T]]:
    """Merge the ranks' ``{client_id: result}`` maps into the round's client order (a fixed order for every rank)."""
    merged: dict[int, T] = {}
    for part in per_rank:
        merged.update(part)
    missing = [cid for cid in client_ids if cid not in merged]
    if missing:
        raise RuntimeError(f"no rank reported clients {missing}")
    return [(cid, merged[cid]) for cid in client_ids]


def same_on_all_ranks(state: dict[str, torch.Tensor], world_size: int) -> bool:
    """Whether every rank holds bitwise the same tensors (a cheap guard for the replicated global adapter)."""
    if world_size == 1:
        return True
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return len(set(all_gather_objects(digest.hexdigest(), world_size))) == 1
