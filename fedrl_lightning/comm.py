"""The channel: everything that crosses the (simulated) network is serialized here and its bytes are counted."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

Direction = Literal["down", "up"]


class NonFiniteUpdateError(ValueError):
    """A client sent NaN or Inf."""


class Channel:
    """Serializes tensor payloads with safetensors and keeps a ledger of bytes per round, client and direction.

    What a client receives is the deserialized copy, never the sender's tensors, so the simulation cannot share
    memory by accident.
    """

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, int, str], int] = defaultdict(int)
        # The tensors' data alone (numel x element size), without the serialization header: what formulas predict.
        self._tensor_bytes: dict[tuple[int, int, str], int] = defaultdict(int)

    def send_down(self, round_idx: int, client_id: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        """Server -> client."""
        return self._transfer(round_idx, client_id, "down", payload)

    def send_up(self, round_idx: int, client_id: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        """Client -> server; rejects NaN/Inf, naming the client and the tensor."""
        for name, tensor in payload.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteUpdateError(f"client {client_id} sent a non-finite tensor {name!r} in round {round_idx}")
        return self._transfer(round_idx, client_id, "up", payload)

    def _transfer(self, round_idx: int, client_id: int, direction: Direction, payload: dict[str, Tensor]) -> dict:
        if not payload:
            return {}
        blob = st_save({k: v.detach().contiguous().cpu() for k, v in payload.items()})
        self._bytes[(round_idx, client_id, direction)] += len(blob)
        self._tensor_bytes[(round_idx, client_id, direction)] += sum(
            v.numel() * v.element_size() for v in payload.values()
        )
        return st_load(blob)

    def record(self, round_idx: int, client_id: int, direction: Direction, num_bytes: int) -> None:
        """Count bytes of a non-tensor message (text, floats) sent outside ``send_*``."""
        self._bytes[(round_idx, client_id, direction)] += num_bytes

    def totals(self, round_idx: int | None = None) -> dict[str, int]:
        """Bytes down and up, for one round or the whole run."""
        out = {"down": 0, "up": 0}
        for (r, _, direction), n in self._bytes.items():
            if round_idx is None or r == round_idx:
                out[direction] += n
        return out

    def ledger(self) -> list[dict[str, int | str]]:
        """One row per (round, client, direction): ``bytes`` on the wire, ``tensor_bytes`` of tensor data in them."""
        return [
            {"round": r, "client": c, "direction": d, "bytes": n, "tensor_bytes": self._tensor_bytes.get((r, c, d), 0)}
            for (r, c, d), n in sorted(self._bytes.items())
        ]

    def add_rows(self, rows: list[dict[str, int | str]]) -> None:
        """Count ``ledger()`` rows recorded by another process (a rank that ran those clients)."""
        for row in rows:
            key = (row["round"], row["client"], row["direction"])
            self._bytes[key] += row["bytes"]
            self._tensor_bytes[key] += row.get("tensor_bytes", 0)

    def state_dict(self) -> dict:
        return {"ledger": self.ledger()}

    def load_state_dict(self, state: dict) -> None:
        self._bytes.clear()
        self._tensor_bytes.clear()
        self.add_rows(state["ledger"])
