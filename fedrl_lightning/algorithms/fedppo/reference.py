"""Federated PPO (TunePPO): each client's KL reference is a weighted mixture of its peers' policy snapshots.

``research/algorithms.md`` §5. Run it with ``aggregation: null`` (clients keep their own adapters, no averaging)
and a module whose loss has a KL term to the reference (``PPOModule`` with ``kl_coef > 0``, or ``beta > 0``).
One round is one sync period: TunePPO's ``update_every_n_steps`` is the trainer's ``local_steps``. At the end of a
round every client that trained publishes its adapter as its new snapshot; the next round's references mix the
snapshots of that sync (all clients see the same versions, as in TunePPO's lock-step).

[CHOICE] Snapshots are adapters on the one resident base model: TunePPO merges the LoRA into a per-agent base and
resets it at each sync, which would need one base model per client here. Keeping the adapter (and its optimizer
state, which TunePPO does not reset either) gives the same policy at every sync point.

Communication, through the trainer's channel (``comm/bytes_*``):

* ``snapshot_exchange`` (default): at a sync a client uploads its adapter once; before its next round it downloads
  the snapshots of the peers it mixes that it has not seen yet, and computes their logits locally.
* ``logit_exchange`` (TunePPO's protocol): snapshots never leave their owner; for every reference pass the client
  sends its sequences to each mixed peer and receives that peer's completion logits (B, C, V) back. TunePPO sends
  logits for all prompt + completion positions; only the completion positions are sent here.
* Score-based weights add one float per client up and N floats down per sync.

With an aggregator (e.g. ``FedAvg``: TunePPO's FedAvg-of-LoRA mode) the reference is the synced global model at
the start of the round, which the client already holds: no extra bytes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.algorithms.fedppo.mixture import (
    MixtureReference,
    MixtureSpace,
    product_weights,
    score_weights,
    uniform_weights,
)
from fedrl_lightning.callbacks import Callback

Weighting = Literal["uniform", "score", "product"]
Exchange = Literal["snapshot_exchange", "logit_exchange"]
_FLOAT_BYTES = 4


class PeerMixtureReference(Callback):
    """Sets each client's KL reference to the mixture of the peers' snapshots (Federated PPO).

    Args:
        weighting: ``uniform`` (self weight α, the rest shared equally), ``score`` (softmax of the peers' summed
            scores since the last sync, the same vector for every client) or ``product`` (both, renormalised).
        self_preference: α of the uniform weighting; None gives every peer 1/N; 1.0 is isolated PPO whose
            reference is its own snapshot, refreshed at every sync.
        self_preference_end: if set, α moves linearly from ``self_preference`` to this over the run's rounds (one
            step per sync, as TunePPO's ``linearly_scheduled``).
        score_temperature: temperature of the score softmax.
        score_metric: the client metric whose per-step mean, times the local steps, is a peer's score S_j
            (``objective/scores`` for PPO; ``reward`` otherwise).
        space: mix in ``logits`` (TunePPO's implementation) or ``probs``.
        exchange: ``snapshot_exchange`` or ``logit_exchange`` (see the module docstring).
        logit_dtype: wire dtype of exchanged logits (TunePPO sends bf16; float32 keeps the two modes identical).
    """

    def __init__(
        self,
        weighting: Weighting = "uniform",
        self_preference: float | None = None,
        self_preference_end: float | None = None,
        score_temperature: float = 1.0,
        score_metric: str = "objective/scores",
        space: MixtureSpace = "logits",
        exchange: Exchange = "snapshot_exchange",
        logit_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ) -> None:
        if weighting not in ("uniform", "score", "product"):
            raise ValueError(f"weighting must be uniform, score or product, got {weighting!r}")
        if exchange not in ("snapshot_exchange", "logit_exchange"):
            raise ValueError(f"exchange must be snapshot_exchange or logit_exchange, got {exchange!r}")
        for name, a in (("self_preference", self_preference), ("self_preference_end", self_preference_end)):
            if a is not None and not 0 <= a <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {a}")
        if self_preference_end is not None and self_preference is None:
            raise ValueError("self_preference_end needs a self_preference to start from")
        self.weighting, self.self_preference, self.self_preference_end = weighting, self_preference, self_preference_end
        self.score_temperature, self.score_metric = score_temperature, score_metric
        self.space, self.exchange, self.logit_dtype = space, exchange, getattr(torch, logit_dtype)
        self.snapshots: dict[int, dict[str, Tensor]] = {}  # the last sync's snapshot of every client
        self.versions: dict[int, int] = {}  # the round each snapshot was published (0 = the initial adapter)
        self.seen: dict[int, dict[int, int]] = {}  # per client, the version of each peer's snapshot it holds
        self.scores: dict[int, float] = {}  # S_j since the last sync
        self._pending: dict[int, tuple[dict[str, Tensor], float]] = {}

    # -- the schedule and the weights --------------------------------------------------------------------------

    def alpha(self, round_idx: int, num_rounds: int) -> float | None:
        """The self-preference of ``round_idx`` (1-based), linearly scheduled when ``self_preference_end`` is set."""
        if self.self_preference_end is None or num_rounds <= 1:
            return self.self_preference
        frac = (round_idx - 1) / (num_rounds - 1)
        return self.self_preference + frac * (self.self_preference_end - self.self_preference)

    def weights(self, peers: list[int], client_id: int, alpha: float | None) -> Tensor:
        """(N,) the mixing weights of ``client_id`` over ``peers``."""
        uniform = uniform_weights(len(peers), peers.index(client_id), alpha)
        if self.weighting == "uniform":
            return uniform
        scores = score_weights(torch.tensor([self.scores.get(p, 0.0) for p in peers]), self.score_temperature)
        return scores if self.weighting == "score" else product_weights(uniform, scores)

    # -- hooks -------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        if not self.snapshots:  # a fresh run (a resumed one has them from its checkpoint): every client starts here
            initial = module.trainable_state()
            self.snapshots = {cid: initial for cid in trainer.data.client_ids()}
            self.versions = dict.fromkeys(self.snapshots, 0)
            # Everyone holds the initial adapter already (it comes from the shared seed): nothing to download.
            self.seen = {cid: dict(self.versions) for cid in self.snapshots}

    def on_round_start(self) -> None:
        self._pending.clear()  # a retried round starts over

    def on_client_start(self, trainer: Any, round_idx: int, client_id: int, module: Any) -> None:
        if trainer.aggregation is not None:  # FedAvg-of-LoRA mode: the reference is the synced global model
            module.reference_policy = MixtureReference([trainer.global_state], torch.ones(1, dtype=torch.float64))
            return
        peers = sorted(self.snapshots)
        w = self.weights(peers, client_id, self.alpha(round_idx, trainer.num_rounds))
        if self.weighting != "uniform":  # the peers' scores come down with the sync
            trainer.comm.record(round_idx, client_id, "down", _FLOAT_BYTES * len(peers))
        mixed = [p for p, wp in zip(peers, w.tolist()) if wp > 0 and p != client_id]
        if self.exchange == "snapshot_exchange":
            new = self._not_yet_held(client_id, mixed)
            if new:
                payload = {f"peer{p}/{k}": v for p in new for k, v in self.snapshots[p].items()}
                trainer.comm.send_down(round_idx, client_id, payload)
                self._hold(client_id, new)
            transport = None
        else:
            transport = self._logit_transport(trainer, round_idx, client_id, peers)
        module.reference_policy = MixtureReference([self.snapshots[p] for p in peers], w, self.space, transport)
        for p, wp in zip(peers, w.tolist()):
            module.tracker.update(f"peers/weight_{'self' if p == client_id else f'client{p}'}", wp)

    def _not_yet_held(self, client_id: int, peers: list[int]) -> list[int]:
        """The peers whose current snapshot ``client_id`` has not downloaded yet."""
        held = self.seen.get(client_id, {})
        return [p for p in peers if held.get(p) != self.versions[p]]

    def _hold(self, client_id: int, peers: list[int]) -> None:
        self.seen.setdefault(client_id, {}).update({p: self.versions[p] for p in peers})

    def _logit_transport(self, trainer: Any, round_idx: int, client_id: int, peers: list[int]) -> Any:
        def transport(index: int, logits: Tensor, sequences: dict[str, Tensor]) -> Tensor:
            if peers[index] == client_id:  # its own snapshot: computed where it lives
                return logits
            trainer.comm.send_up(round_idx, client_id, sequences)  # to the peer
            back = trainer.comm.send_down(round_idx, client_id, {"logits": logits.to(self.logit_dtype)})
            return back["logits"]

        return transport

    def on_client_end(self, trainer: Any, round_idx: int, client_id: int, update: Any) -> None:
        trainer.module.reference_policy = None
        if trainer.aggregation is None and self.exchange == "snapshot_exchange":
            # Again here (idempotent): on_client_start ran on the client's rank only, this hook runs on every rank.
            peers = sorted(self.snapshots)
            w = self.weights(peers, client_id, self.alpha(round_idx, trainer.num_rounds))
            self._hold(client_id, [p for p, wp in zip(peers, w.tolist()) if wp > 0 and p != client_id])
        steps = trainer.local_steps
        score = update.metrics.get(self.score_metric, update.metrics.get("reward", 0.0)) * steps
        snapshot = update.state
        if trainer.aggregation is None and self.exchange == "snapshot_exchange":
            snapshot = trainer.comm.send_up(round_idx, client_id, snapshot)  # published to the peers
        elif trainer.aggregation is None:  # the client's stored adapter (views): its next round rewrites it
            snapshot = {k: v.clone() for k, v in snapshot.items()}
        if self.weighting != "uniform":
            trainer.comm.record(round_idx, client_id, "up", _FLOAT_BYTES)
        self._pending[client_id] = (snapshot, score)

    def on_round_end(self, trainer: Any, round_idx: int) -> None:
        """The sync: every client that trained this round publishes its snapshot and score at once."""
        for cid, (snapshot, score) in self._pending.items():
            self.snapshots[cid], self.versions[cid], self.scores[cid] = snapshot, round_idx, score
            self.seen.setdefault(cid, {})[cid] = round_idx
        self._pending.clear()

    # -- resume ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots, "versions": self.versions, "seen": self.seen, "scores": self.scores}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots, self.versions = dict(state["snapshots"]), dict(state["versions"])
        self.seen, self.scores = {c: dict(v) for c, v in state["seen"].items()}, dict(state["scores"])


__all__ = ["PeerMixtureReference"]
