"""Federated PPO (TunePPO), in one place.

- ``mixture``: the mixture reference policy over peers' snapshots and its weightings (pure functions).
- ``reference``: ``PeerMixtureReference``, the callback that gives each client its peers' mixture as KL reference.

The PPO step itself (value head, GAE) is ``fedrl_lightning.modules.PPOModule``.
"""

from fedrl_lightning.algorithms.fedppo.mixture import MixtureReference, product_weights, score_weights, uniform_weights
from fedrl_lightning.algorithms.fedppo.reference import PeerMixtureReference

__all__ = ["MixtureReference", "PeerMixtureReference", "product_weights", "score_weights", "uniform_weights"]
