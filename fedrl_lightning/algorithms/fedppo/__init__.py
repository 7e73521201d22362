"""Federated PPO (TunePPO), in one place.

- ``mixture``: the mixture reference policy over peers' snapshots and its weightings (pure functions).
- ``peers``: the round's messages: ``PeerMixture``, the aggregator that holds the snapshots and sends each client its
  mixture, and ``PeerReference``, the PPO module's argument that turns what a client received into its KL reference.

The PPO step itself (value head, GAE) is ``fedrl_lightning.modules.PPOModule``.
"""

from fedrl_lightning.algorithms.fedppo.mixture import MixtureReference, product_weights, score_weights, uniform_weights
from fedrl_lightning.algorithms.fedppo.peers import PeerMixture, PeerReference

__all__ = ["MixtureReference", "PeerMixture", "PeerReference", "product_weights", "score_weights", "uniform_weights"]
