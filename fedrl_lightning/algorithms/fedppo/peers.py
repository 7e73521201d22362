"""Federated PPO (TunePPO) as round messages: the ``PeerMixture`` aggregator and the module's ``PeerReference``.

``research/algorithms.md`` §5. Every client trains its own PPO policy, and its KL reference is a weighted mixture of
the peers' policy snapshots, so the trust-region KL pulls it toward where its peers are. One round is one sync
period (TunePPO's ``update_every_n_steps`` is the trainer's ``local_steps``):

* down: a client starts from its own adapter (nothing global is sent) and receives its mixing weights and the
  snapshot of every other peer it mixes with weight > 0 (``PeerMixture.client_downlink``, ``mixture_message``);
* during the round its module's ``PeerReference`` mixes those snapshots and the adapter the round started from (its
  own snapshot) into the reference of the KL term (``MixtureReference``);
* up: at the end of the round its adapter goes up. ``PeerMixture.aggregate`` is the sync: every client that trained
  publishes it as its new snapshot, with its score, at once, so all clients of a round mix the same versions
  (TunePPO's lock-step). A retried round never reaches it, so it publishes nothing.

[CHOICE] Snapshots are adapters on the one resident base model: TunePPO merges the LoRA into a per-agent base and
resets it at each sync, which would need one base model per client here. Keeping the adapter (and its optimizer
state, which TunePPO does not reset either) gives the same policy at every sync point.

[CHOICE] Every mixed snapshot is sent every round: a client keeps no cache of its peers' adapters (that would be N
adapters per client), and with full participation every snapshot changes every round anyway. A client that has not
trained yet has no snapshot and is not mixed; so in round 1 each reference is the client's own start adapter, which
is what a mixture of the identical initial snapshots gives, at no bytes.

TunePPO's logit exchange (peers compute logits on the client's sequences during each step) is not a round message
and is not offered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import Aggregator, ClientUpdate
from fedrl_lightning.algorithms.fedppo.mixture import (
    MixtureReference,
    MixtureSpace,
    product_weights,
    score_weights,
    uniform_weights,
)

Weighting = Literal["uniform", "score", "product"]
IDS = "peers/ids"
"""(M,) int64: the other peers a client mixes, ascending."""
WEIGHTS = "peers/weights"
"""(1 + M,) float64: the client's own weight, then its peers' in ``IDS`` order."""


def snapshot_prefix(peer: int) -> str:
    """Where peer ``peer``'s snapshot tensors are in a client's message."""
    return f"peers/client{peer}/"


def mixture_message(
    self_weight: float, peers: Sequence[int], weights: Sequence[float], snapshots: Sequence[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """What one client receives: ``IDS``, ``WEIGHTS`` and each mixed peer's snapshot under ``snapshot_prefix``.

    Args:
        self_weight: the weight of the client's own snapshot (the adapter it starts from, not sent).
        peers: the M other peers it mixes.
        weights: (M,) their weights.
        snapshots: their snapshots (the tensors are referenced, not copied).
    """
    message = {
        IDS: torch.tensor(list(peers), dtype=torch.int64),
        WEIGHTS: torch.tensor([self_weight, *weights], dtype=torch.float64),
    }
    for peer, snapshot in zip(peers, snapshots):
        message.update({snapshot_prefix(peer) + name: t for name, t in snapshot.items()})
    return message


def read_mixture(received: Mapping[str, Tensor]) -> tuple[Tensor, list[int], list[dict[str, Tensor]]]:
    """(weights (1 + M,), the M peers, their snapshots) from ``mixture_message``'s output; other keys are ignored.
    Without one the client mixes only itself: ((1.0,), [], [])."""
    if IDS not in received:
        return torch.ones(1, dtype=torch.float64), [], []
    peers = [int(p) for p in received[IDS].tolist()]
    snapshots = []
    for peer in peers:
        prefix = snapshot_prefix(peer)
        snapshots.append({k[len(prefix) :]: v for k, v in received.items() if k.startswith(prefix)})
    return received[WEIGHTS].double(), peers, snapshots


class PeerMixture(Aggregator):
    """Federated PPO's server: every client's last snapshot and score, and each client's mixture of them.

    A personalized aggregator: clients keep their own adapters; run it with a module whose loss has a KL term to
    the reference and a ``PeerReference`` (``PPOModule(kl_coef > 0, peer_reference=PeerReference())``).

    Args:
        weighting: ``uniform`` (own weight α, the rest shared equally), ``score`` (softmax of the peers' scores
            S_j / T, the same vector for every client) or ``product`` (both, renormalised).
        self_preference: α of the uniform weighting; None gives every peer 1/N; 1.0 is isolated PPO whose
            reference is its own snapshot, refreshed at every sync (nothing is sent down).
        self_preference_end: if set, α moves linearly from ``self_preference`` to this over the run's rounds (one
            step per sync, as TunePPO's ``linearly_scheduled``).
        score_temperature: T of the score softmax. S_j here is the mean over the client's last round's steps;
            TunePPO sums the per-step means over a sync period of k steps, which is T = T_TunePPO / k here.
        score_metric: the client training metric that is S_j (``objective/scores`` for PPO; ``reward`` if absent).
    """

    personalized = True

    def __init__(
        self,
        weighting: Weighting = "uniform",
        self_preference: float | None = None,
        self_preference_end: float | None = None,
        score_temperature: float = 1.0,
        score_metric: str = "objective/scores",
    ) -> None:
        if weighting not in ("uniform", "score", "product"):
            raise ValueError(f"weighting must be uniform, score or product, got {weighting!r}")
        for name, a in (("self_preference", self_preference), ("self_preference_end", self_preference_end)):
            if a is not None and not 0 <= a <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {a}")
        if self_preference_end is not None and self_preference is None:
            raise ValueError("self_preference_end needs a self_preference to start from")
        if not score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0, got {score_temperature}")
        self.weighting, self.self_preference, self.self_preference_end = weighting, self_preference, self_preference_end
        self.score_temperature, self.score_metric = score_temperature, score_metric
        self.snapshots: dict[int, dict[str, Tensor]] = {}  # the last sync's snapshot of every client that trained
        self.scores: dict[int, float] = {}  # S_j at the last sync

    def alpha(self, round_idx: int, num_rounds: int) -> float | None:
        """The self-preference of ``round_idx`` (1-based), linearly scheduled when ``self_preference_end`` is set."""
        if self.self_preference_end is None or num_rounds <= 1:
            return self.self_preference
        frac = (round_idx - 1) / (num_rounds - 1)
        return self.self_preference + frac * (self.self_preference_end - self.self_preference)

    def weights(self, peers: list[int], client_id: int, alpha: float | None) -> Tensor:
        """(N,) the mixing weights of ``client_id`` over ``peers`` (which include it)."""
        uniform = uniform_weights(len(peers), peers.index(client_id), alpha)
        if self.weighting == "uniform":
            return uniform
        scores = score_weights(torch.tensor([self.scores.get(p, 0.0) for p in peers]), self.score_temperature)
        return scores if self.weighting == "score" else product_weights(uniform, scores)

    def client_downlink(self, client_id: int, round_idx: int, num_rounds: int) -> dict[str, Tensor]:
        """``mixture_message`` for ``client_id``: the peers it mixes with weight > 0 and their snapshots; nothing
        when it mixes only itself."""
        peers = sorted({*self.snapshots, client_id})
        w = self.weights(peers, client_id, self.alpha(round_idx, num_rounds)).tolist()
        mixed = [(p, wp) for p, wp in zip(peers, w) if wp > 0 and p != client_id]
        if not mixed:
            return {}
        ids, weights = [p for p, _ in mixed], [wp for _, wp in mixed]
        return mixture_message(w[peers.index(client_id)], ids, weights, [self.snapshots[p] for p in ids])

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """The sync: every client of the round publishes its adapter (in the global adapter's dtypes) and score at
        once. Returns ``global_state`` unchanged (it stays the initial adapter).

        Raises:
            ValueError: an update's tensors are not the adapter's.
        """
        for u in updates:
            if u.state.keys() != global_state.keys():
                raise ValueError(f"client {u.client_id} sent tensors that are not the adapter's")
            self.snapshots[u.client_id] = {k: u.state[k].to(v.dtype) for k, v in global_state.items()}
            self.scores[u.client_id] = float(u.metrics.get(self.score_metric, u.metrics.get("reward", 0.0)))
        return global_state

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": {c: dict(s) for c, s in self.snapshots.items()}, "scores": dict(self.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = {int(c): dict(s) for c, s in state["snapshots"].items()}
        self.scores = {int(c): float(s) for c, s in state["scores"].items()}


class PeerReference:
    """The client's half: the round's KL reference from what it received (``PPOModule``'s ``peer_reference``).

    From a ``PeerMixture`` message: the mixture of the adapter the round started from (the client's own snapshot)
    and the peers' snapshots. Without one (an ordinary aggregator such as FedAvg, TunePPO's FedAvg-of-LoRA mode; or
    a client that mixes only itself) the reference is the adapter the round started from: the synced global model,
    or the client's own snapshot. That costs no extra bytes.

    Args:
        space: mix in ``logits``: log softmax(Σ_j w_j z_j / T), TunePPO's implementation; or ``probs``:
            log Σ_j w_j softmax(z_j / T).
    """

    def __init__(self, space: MixtureSpace = "logits") -> None:
        if space not in ("logits", "probs"):
            raise ValueError(f"space must be 'logits' or 'probs', got {space!r}")
        self.space = space

    def reference(self, start: dict[str, Tensor], received: Mapping[str, Tensor]) -> MixtureReference:
        """The mixture of ``start`` (the trainable state the round starts from) and the received snapshots."""
        weights, _, snapshots = read_mixture(received)
        return MixtureReference([start, *snapshots], weights, self.space)

    @staticmethod
    def weights(received: Mapping[str, Tensor]) -> dict[str, float]:
        """The round's mixing weights by name (``self``, ``client<j>``), for the logs."""
        weights, peers, _ = read_mixture(received)
        w = weights.tolist()
        return {"self": w[0], **{f"client{p}": wp for p, wp in zip(peers, w[1:])}}


__all__ = ["PeerMixture", "PeerReference", "mixture_message", "read_mixture", "snapshot_prefix"]
