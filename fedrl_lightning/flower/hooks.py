"""Callbacks across the wire: which hook runs on which side of a Flower run, and FGRPO's split.

In one process the trainer fires every hook. In a Flower run the ClientApp's ``FederatedTrainer`` fires the
client-side hooks (``on_fit_start`` once per process, then ``on_client_start`` and ``on_local_step_end`` inside
``client_round``), and the ServerApp fires ``on_before_aggregate`` and ``on_after_aggregate`` with a
``ServerView`` as ``trainer``: the server's state, no clients, no module.

FGRPO (``RelativeGainWeighting``) with ``baseline_on_client`` keeps each client's baseline in that client's private
state. Its ``on_before_aggregate`` does both halves in one process; here they are split along the same line: the
client computes its gain against its own baseline with ``client_gain`` and uploads the gain alone, and the server
turns the round's gains into weights with ``weights``. With the baseline on the server, ``on_before_aggregate``
runs on the server unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedrl_lightning.aggregation import Aggregator, ClientUpdate
from fedrl_lightning.callbacks.adaptive_aggregation import RelativeGainWeighting
from fedrl_lightning.comm import Channel

GAIN_METRIC = "fgrpo/gain"
"""The metric a client uploads its FGRPO gain under (the name the in-process callback logs it under)."""


@dataclass
class ServerView:
    """What server-side hooks receive as ``trainer`` in a Flower run.

    Attributes:
        aggregation: the server's aggregator.
        global_state: the global adapter.
        comm: the server's byte ledger.
        round_idx: rounds completed.
        num_rounds: rounds in the run.
        client_states: always empty: client state stays on the clients.
    """

    aggregation: Aggregator
    global_state: dict[str, torch.Tensor]
    comm: Channel
    round_idx: int = 0
    num_rounds: int = 1
    client_states: dict[int, Any] = field(default_factory=dict)


def call_hook(callbacks: Sequence[Any], name: str, **kwargs: Any) -> None:
    """Call ``name`` on every callback that has it, with the keyword arguments it declares (as ``fabric.call``)."""
    for callback in callbacks:
        method = getattr(callback, name, None)
        if not callable(method):
            continue
        params = inspect.signature(method).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            method(**kwargs)
        else:
            method(**{k: v for k, v in kwargs.items() if k in params})


def _client_baseline(callback: Any) -> bool:
    return isinstance(callback, RelativeGainWeighting) and callback.baseline_on_client


def client_side(callbacks: Sequence[Any], client_extra: dict[str, Any], update: ClientUpdate) -> None:
    """The client's half of the server-side hooks: FGRPO's gain against the client's own baseline.

    Updates the baseline in ``client_extra`` (the client's private state, saved on its disk) and puts the gain into
    ``update.metrics``, which go up with the adapter.

    Raises:
        ValueError: the round's metrics lack the callback's ``signal``.
    """
    for callback in callbacks:
        if _client_baseline(callback):
            performance = float(update.metrics.get(callback.signal, math.nan))
            if math.isnan(performance):
                raise ValueError(f"client {update.client_id} has no {callback.signal!r} metric for FGRPO weighting")
            update.metrics[GAIN_METRIC] = callback.client_gain_in(client_extra, performance)


def before_aggregate(callbacks: Sequence[Any], view: ServerView, round_idx: int, updates: list[ClientUpdate]) -> None:
    """``on_before_aggregate`` on the server; FGRPO with client baselines weights the uploaded gains.

    Raises:
        ValueError: an FGRPO client sent no gain.
    """
    for callback in callbacks:
        if not _client_baseline(callback):
            call_hook([callback], "on_before_aggregate", trainer=view, round_idx=round_idx, updates=updates)
            continue
        missing = [u.client_id for u in updates if GAIN_METRIC not in u.metrics]
        if missing:
            raise ValueError(f"clients {missing} sent no {GAIN_METRIC!r} for FGRPO weighting")
        callback.apply_weights(updates, [u.metrics[GAIN_METRIC] for u in updates])
