"""Which clients take part in a round: seeded by (seed, round), so a resumed run picks the same clients."""

from __future__ import annotations

import math

import torch


class UniformSelector:
    """Sample clients uniformly without replacement each round.

    Args:
        fraction: share of the clients to select (rounded up, at least one), used when ``count`` is None.
        count: exact number of clients per round; overrides ``fraction``.
        seed: selection seed; round r uses the generator seeded with (seed, r).
    """

    def __init__(self, fraction: float = 1.0, count: int | None = None, seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.fraction, self.count, self.seed = fraction, count, seed

    def num_selected(self, num_clients: int) -> int:
        k = self.count if self.count is not None else math.ceil(self.fraction * num_clients)
        if k > num_clients:
            raise ValueError(f"cannot select {k} clients out of {num_clients}")
        return max(1, k)

    def select(self, round_idx: int, client_ids: list[int]) -> list[int]:
        """The sorted ids of this round's clients."""
        k = self.num_selected(len(client_ids))
        if k == len(client_ids):
            return sorted(client_ids)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx)
        picked = torch.randperm(len(client_ids), generator=gen)[:k]
        return sorted(client_ids[i] for i in picked.tolist())
