"""A Flower client's private state on its own disk, between rounds and across process restarts.

In a Flower deployment every message runs in a fresh ``flwr-clientapp`` process, and ``Context.state`` is
serialised with every message, so the client's state (optimizer moments, RNG, data cursor, algorithm state such as
SCAFFOLD's c_i or FGRPO's baseline: a ``ClientState``) lives in files instead, one verified checkpoint per round
the client trained (``fedrl_lightning.checkpoint``: atomic, hashed, torn ones skipped).

A round r starts from the newest state saved *before* r. So a round the server retries, or repeats after it was
restarted from an older checkpoint, starts from the same state as the first time, and the run stays exact.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from lightning.fabric import Fabric

from fedrl_lightning import checkpoint
from fedrl_lightning.client_state import ClientState

log = logging.getLogger(__name__)


class ClientStateStore:
    """One client's saved states, ``<root>/client<id>/round-NNNNNN/``.

    Args:
        root: the directory of all clients' states on this machine.
        client_id: whose states (the partition id).
        keep: states kept (the newest); at least the server's ``keep_checkpoints``, so that a resumed server finds
            the state its checkpoint needs.
        fabric: the client's Fabric, which writes the states; None = a single-process CPU one.
    """

    def __init__(self, root: str | Path, client_id: int, keep: int = 2, fabric: Fabric | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(root) / f"client{client_id}"
        self.client_id, self.keep = client_id, keep
        self.fabric = fabric if fabric is not None else checkpoint.fabric(accelerator="cpu", devices=1)

    def rounds(self) -> list[int]:
        """Rounds with a saved state (valid or not), ascending."""
        return sorted(int(p.name.split("-")[-1]) for p in self.directory.glob("round-*") if p.is_dir())

    def load(self, before_round: int) -> ClientState | None:
        """The newest valid state saved before ``before_round``; None if this client never trained.

        Raises:
            FileNotFoundError: states exist but none from before ``before_round`` (pruned, or the server was
                restarted from a checkpoint older than every kept state): starting fresh would silently break the
                run's exactness.
        """
        saved = self.rounds()
        for r in reversed(saved):
            path = self.directory / f"round-{r:06d}"
            if r < before_round and checkpoint.is_valid(path):
                return ClientState(**checkpoint.load(path)["client"])
            if r < before_round:
                log.warning("client state %s is incomplete or corrupt; trying an earlier one", path)
        if saved:
            raise FileNotFoundError(
                f"client {self.client_id}: no valid state before round {before_round} in {self.directory} "
                f"(saved rounds {saved}); raise `keep` or restart the server from a newer checkpoint"
            )
        return None

    def save(self, round_idx: int, state: ClientState) -> Path:
        """Save the state after round ``round_idx`` (atomically; older states beyond ``keep`` are removed)."""
        # Not dataclasses.asdict, which deep-copies every tensor.
        fields_ = {f.name: getattr(state, f.name) for f in fields(state)}
        new = checkpoint.round_path(self.directory, round_idx)
        older = [p for p in sorted(self.directory.glob("round-*")) if p != new]  # this client's directory only
        prune = older[: max(0, len(older) - (self.keep - 1))]
        return checkpoint.save(self.directory, round_idx, self.fabric, {"client": fields_}, prune)
