"""The published federated algorithms that are more than an aggregator, one package each.

- ``fedgrpo``: FedGRPO (AAAI 2026): the server trains on questions it cannot grade; expert clients chosen by a
  confidence graph score candidate answers and return only floats.
- ``fedppo``: Federated PPO (TunePPO): each client's KL reference is a weighted mixture of its peers' policies.

The parameter-federation algorithms (FedAvg and its family, SCAFFOLD, FGRPO, FedMOA's server side, DP-FedAvg) are
aggregators and live beside them in ``fedrl_lightning.aggregation`` (and ``privacy``); FedMOA's client side is
``fedrl_lightning.modules.FedMOAModule``.
"""
