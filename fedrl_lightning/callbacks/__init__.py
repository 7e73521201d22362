"""Callbacks decide *when*; the *how* lives in rollout/, aggregation/ and modules/.

A callback is any object with some of the hook methods below. The trainer fires them with
``fabric.call(hook, **kwargs)``, which passes each method only the keyword arguments it declares, so a callback
writes ``def on_round_end(self, metrics): ...`` and nothing more. Subclassing ``Callback`` is optional; it only
documents the hooks.
"""

from __future__ import annotations

from typing import Any

HOOKS: tuple[str, ...] = (
    "on_fit_start",  # trainer, module
    "on_round_start",  # trainer, round_idx
    "on_clients_selected",  # trainer, round_idx, client_ids
    "on_client_start",  # trainer, round_idx, client_id, module
    "on_local_step_end",  # trainer, round_idx, client_id, module, step
    "on_client_end",  # trainer, round_idx, client_id, update
    "on_before_aggregate",  # trainer, round_idx, updates (set ClientUpdate.weight here to reweight)
    "on_after_aggregate",  # trainer, round_idx, global_state
    "on_evaluate_end",  # trainer, round_idx, metrics
    "on_round_end",  # trainer, round_idx, metrics
    "on_fit_end",  # trainer
)
"""Every hook, in firing order within a run. ``on_client_start`` and ``on_local_step_end`` fire while a client trains,
on the rank that runs it; ``on_client_end`` fires once every selected client has finished, on every rank, per
successful client in the round's order (so state a callback keeps from it is the same on all ranks)."""


class Callback:
    """Base class listing the hooks; every method is a no-op. Override the ones you need with the kwargs you use."""

    def on_fit_start(self, trainer: Any, module: Any) -> None: ...

    def on_round_start(self, trainer: Any, round_idx: int) -> None: ...

    def on_clients_selected(self, trainer: Any, round_idx: int, client_ids: list[int]) -> None: ...

    def on_client_start(self, trainer: Any, round_idx: int, client_id: int, module: Any) -> None: ...

    def on_local_step_end(self, trainer: Any, round_idx: int, client_id: int, module: Any, step: int) -> None: ...

    def on_client_end(self, trainer: Any, round_idx: int, client_id: int, update: Any) -> None: ...

    def on_before_aggregate(self, trainer: Any, round_idx: int, updates: list[Any]) -> None: ...

    def on_after_aggregate(self, trainer: Any, round_idx: int, global_state: dict[str, Any]) -> None: ...

    def on_evaluate_end(self, trainer: Any, round_idx: int, metrics: dict[str, float]) -> None: ...

    def on_round_end(self, trainer: Any, round_idx: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer: Any) -> None: ...


__all__ = ["HOOKS", "Callback"]
