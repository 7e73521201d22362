"""Server-side aggregators: ``aggregate(global_state, updates) -> new global state``.

Each aggregator keeps what it needs between rounds and exposes ``state_dict()``/``load_state_dict()`` so a resumed
run continues exactly. Arithmetic is done in float64 on CPU; results keep the dtype of the input tensors, and server
state (momentum, moments, control variates) is kept in float64 and never updated in place.

Notation (``research/fed_anchors.md`` §6): global adapter x, client i returns y_i, delta Δ_i = y_i - x, normalised
weights p_i, pseudo-gradient Δ̄ = Σ p_i Δ_i.

Modules: ``base`` (``ClientUpdate``, ``LocalObjective``, the base classes, client weights, ``weighted_average``),
``lora`` (LoRA factor pairing and product averaging), ``fedavg`` (FedAvg, FedProx, TaskAwareFedAvg: FedMOA's server
side), ``server_opt`` (FedAvgM, FedAdagrad, FedAdam, FedYogi), ``scaffold`` (SCAFFOLD, server and client side),
``fgrpo`` (FGRPO's relative-gain weighting around any of them) and ``robust`` (FedMedian, TrimmedMean, Krum).
Streaming: ``Aggregator.begin(global_state)`` gives the round's ``Accumulator`` (``fold`` each update as it arrives,
then ``finish``). The weighted-mean family (FedAvg, FedProx, FedAvgM, FedAdagrad/FedAdam/FedYogi, SCAFFOLD, with
``separate`` LoRA averaging; DP-FedAvg in ``fedrl_lightning.privacy``) folds each update into one accumulator and
keeps no update; the others (``product`` averaging, TaskAwareFedAvg, FGRPO's weighting, the robust rules, peer
mixtures) buffer every update in a ``Buffer`` until the round ends (``Aggregator.streaming`` says which).
Every public name is importable from here, e.g.
``class_path: fedrl_lightning.aggregation.FedAdam`` in YAML.
"""

from fedrl_lightning.aggregation.base import (
    F64,
    LORA_MODES,
    WEIGHTINGS,
    Accumulator,
    Aggregator,
    Buffer,
    ClientUpdate,
    LocalObjective,
    LoraMode,
    WeightedAggregator,
    WeightedMean,
    WeightedSum,
    Weighting,
    check_choice,
    check_same_keys,
    check_weight,
    client_weights,
    mean64,
    normalised,
    sample_weight,
    sample_weights,
    weighted_average,
)
from fedrl_lightning.aggregation.fedavg import FedAvg, FedProx, ProximalObjective, TaskAwareFedAvg, proximal_term
from fedrl_lightning.aggregation.fgrpo import RelativeGainWeighting
from fedrl_lightning.aggregation.lora import average64, average_states, lora_pairs, product_average
from fedrl_lightning.aggregation.robust import FedMedian, Krum, TrimmedMean
from fedrl_lightning.aggregation.scaffold import (
    Scaffold,
    ScaffoldObjective,
    scaffold_correction,
    scaffold_new_client_c,
)
from fedrl_lightning.aggregation.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedOpt,
    FedYogi,
    ServerOptimizer,
    check_state_keys,
    load_tensors,
)

__all__ = [
    "F64",
    "LORA_MODES",
    "WEIGHTINGS",
    "RelativeGainWeighting",
    "Accumulator",
    "Aggregator",
    "Buffer",
    "ClientUpdate",
    "LocalObjective",
    "ProximalObjective",
    "ScaffoldObjective",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Krum",
    "LoraMode",
    "Scaffold",
    "ServerOptimizer",
    "TaskAwareFedAvg",
    "TrimmedMean",
    "WeightedAggregator",
    "WeightedMean",
    "WeightedSum",
    "Weighting",
    "average64",
    "average_states",
    "check_choice",
    "check_same_keys",
    "check_state_keys",
    "check_weight",
    "client_weights",
    "load_tensors",
    "lora_pairs",
    "mean64",
    "normalised",
    "product_average",
    "proximal_term",
    "sample_weight",
    "sample_weights",
    "scaffold_correction",
    "scaffold_new_client_c",
    "weighted_average",
]
