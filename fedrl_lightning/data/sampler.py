"""``ClientSampler``: one client's deterministic, resumable stream of example-index batches."""

from __future__ import annotations

import numpy as np

from fedrl_lightning.data.common import SAMPLER_STREAM, check, seeded_rng


class ClientSampler:
    """Deterministic, resumable batches of example indices for one client.

    Reshuffles each epoch with seed ``(seed, client_id, epoch)``, so a restored ``state_dict`` continues exactly.
    """

    def __init__(self, num_examples: int, seed: int, client_id: int) -> None:
        """Create a sampler.

        Args:
            num_examples: Size of the client's example list (>= 1).
            seed: Base seed (>= 0).
            client_id: Client id (>= 0); different clients get different orders.
        """
        check(num_examples >= 1, f"ClientSampler needs num_examples >= 1, got {num_examples}")
        check(seed >= 0 and client_id >= 0, f"seed and client_id must be >= 0, got {seed}, {client_id}")
        self.num_examples, self.seed, self.client_id = num_examples, seed, client_id
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = seeded_rng(self.seed, SAMPLER_STREAM, self.client_id, self.epoch).permutation(
                self.num_examples
            )
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self, batch_size: int) -> list[int]:
        """Return the next ``batch_size`` indices, wrapping into the next (reshuffled) epoch as needed."""
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            take = min(batch_size - len(out), self.num_examples - self.position)
            out += self._permutation()[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        """Position to resume from (plus the identity it was created with, checked on load)."""
        return {k: getattr(self, k) for k in ("num_examples", "seed", "client_id", "epoch", "position")}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``; the continuation is identical to the uninterrupted sampler's."""
        for key in ("num_examples", "seed", "client_id"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"ClientSampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        check(epoch >= 0 and 0 <= position < self.num_examples, f"Invalid ClientSampler state: {state}")
        self.epoch, self.position = epoch, position
