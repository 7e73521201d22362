"""Callbacks observe a run and decide *when*; the *how* lives in rollout/, aggregation/ and modules/.

A callback is any object with some of the hook methods below. The server and the client fire them with ``fire``,
which passes each method only the keyword arguments it declares, so a callback writes
``def on_round_end(self, metrics): ...`` and nothing more. Subclassing ``Callback`` is optional; it only documents
the hooks. Server-side hooks receive ``server`` (``fedrl_lightning.server.Server``), client-side hooks ``client``
(``fedrl_lightning.client.Client``); in one process every hook also receives ``trainer`` (the
``FederatedTrainer``) and ``module``. A callback reads what it is given; it does not wire objects together:
algorithm parts that act on training (client objectives, aggregation weights, reference policies, rollout
engines) are constructor arguments of the aggregator, module or rollout backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: callbacks never import the server or the client at run time
    from torch import Tensor

    from fedrl_lightning.aggregation.base import ClientUpdate
    from fedrl_lightning.client import Client
    from fedrl_lightning.modules.policy import PolicyModule
    from fedrl_lightning.server import Server

HOOKS: tuple[str, ...] = (
    "on_fit_start",  # server, round_idx (rounds already done)
    "on_round_start",  # server, round_idx
    "on_clients_selected",  # server, round_idx, client_ids
    "on_client_start",  # client, round_idx, client_id, module
    "on_local_step_end",  # client, round_idx, client_id, module, step, metrics, samples
    "on_client_end",  # server, round_idx, client_id, update
    "on_before_aggregate",  # server, round_idx, updates
    "on_after_aggregate",  # server, round_idx, global_state
    "on_evaluate_end",  # server, round_idx, metrics
    "on_round_end",  # server, round_idx, metrics
    "on_fit_end",  # server
)
"""Every hook, in firing order within a run. ``on_client_start`` and ``on_local_step_end`` fire while a client trains,
where it trains (its rank, its Flower SuperNode); the others fire on the server (in one process: on every rank), and
``on_client_end`` once per successful client in the round's order: right after that client's round when the
aggregator streams (each update is folded, then freed, before the next client trains), after every selected client
has finished when it buffers (a callback with ``on_before_aggregate`` makes every round buffer).
``on_local_step_end`` gets ``step`` (0-based within the round), the step's own ``metrics`` and its scored completions
as ``samples`` (``fedrl_lightning.watch.sample_rows``); ``fedrl_lightning.callbacks.watch`` has the trainer's own."""


def fire(callbacks: Iterable[object], hook: str, **kwargs: Any) -> None:
    """Call ``hook`` on every callback that has it, with the keyword arguments it declares (all, for ``**kwargs``)."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if not callable(method):
            continue
        params = inspect.signature(method).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            method(**kwargs)
        else:
            method(**{k: v for k, v in kwargs.items() if k in params})


def state_key(callbacks: list[object], index: int) -> str:
    """A callback's name in checkpoints: its class name, numbered when several of a class are present."""
    name = type(callbacks[index]).__qualname__
    same = [i for i, cb in enumerate(callbacks) if type(cb).__qualname__ == name]
    return name if len(same) == 1 else f"{name}#{same.index(index)}"


class Callback:
    """Base class listing the hooks; every method is a no-op. Override the ones you need with the kwargs you use."""

    def on_fit_start(self, server: Server, round_idx: int) -> None: ...

    def on_round_start(self, server: Server, round_idx: int) -> None: ...

    def on_clients_selected(self, server: Server, round_idx: int, client_ids: list[int]) -> None: ...

    def on_client_start(self, client: Client, round_idx: int, client_id: int, module: PolicyModule) -> None: ...

    def on_local_step_end(
        self,
        client: Client,
        round_idx: int,
        client_id: int,
        module: PolicyModule,
        step: int,
        metrics: dict[str, float],
        samples: list[dict[str, Any]],
    ) -> None: ...

    def on_client_end(self, server: Server, round_idx: int, client_id: int, update: ClientUpdate) -> None: ...

    def on_before_aggregate(self, server: Server, round_idx: int, updates: list[ClientUpdate]) -> None: ...

    def on_after_aggregate(self, server: Server, round_idx: int, global_state: dict[str, Tensor]) -> None: ...

    def on_evaluate_end(self, server: Server, round_idx: int, metrics: dict[str, float]) -> None: ...

    def on_round_end(self, server: Server, round_idx: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, server: Server) -> None: ...


__all__ = ["HOOKS", "Callback", "fire", "state_key"]
