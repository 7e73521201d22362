"""The server's aggregation of one round: each update folded as it arrives, or buffered until the round ends.

A streaming aggregator (``Aggregator.streaming``: the weighted-mean family) folds each update into one accumulator as
the server receives it, and the server keeps only a summary of the update (``summary``: its id, counts, metrics,
weight and scalar side information, no tensors), so its aggregation memory does not grow with the number of clients.
Everything else buffers every update until the round ends. So does a streaming aggregator when a callback implements
``on_before_aggregate``: that hook receives every update with its tensors, and may set the aggregation weights. When
streaming, ``on_before_aggregate`` receives the summaries (an ``on_client_end`` callback sees each full update).

An accumulator is per round: a round that fails (too few clients, then a retry) drops it, and nothing of the
aggregator has changed before ``finish``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from torch import Tensor

from fedrl_lightning.aggregation.base import Aggregator, Buffer, ClientUpdate

log = logging.getLogger(__name__)
_said: set[tuple[str, str]] = set()  # (aggregator class, reason) already logged: each is said once per process


def summary(update: ClientUpdate) -> ClientUpdate:
    """``update`` without its tensors: the adapter and tensor side information dropped, the scalars kept (its
    ``metrics`` dict is the update's own, so metrics added to either show in both)."""
    extra = {k: v for k, v in update.extra.items() if not isinstance(v, Mapping | Tensor)}
    return replace(update, state={}, extra=extra)


def wants_every_update(callback: object) -> bool:
    """Whether ``callback`` implements ``on_before_aggregate`` (the no-op of ``callbacks.Callback`` does not count)."""
    from fedrl_lightning.callbacks import Callback

    method = getattr(type(callback), "on_before_aggregate", None)
    if method is None:  # an instance attribute, if any (the class is looked at first: no hook is touched)
        return callable(getattr(callback, "on_before_aggregate", None))
    return method is not Callback.on_before_aggregate


def _say_once(aggregator: Aggregator, reason: str, message: str, *args: object) -> None:
    key = (type(aggregator).__qualname__, reason)
    if key not in _said:
        _said.add(key)
        log.info(message, type(aggregator).__name__, *args)


class RoundAggregation:
    """One round's aggregation on the server.

    Args:
        aggregator: the server's aggregator.
        global_state: the global adapter the round started from.
        callbacks: the server's callbacks; one that implements ``on_before_aggregate`` makes the round buffer.

    Attributes:
        streaming: whether updates are folded as they arrive (else buffered).
        seconds: time spent aggregating so far (folds, then ``finish``).
    """

    def __init__(
        self, aggregator: Aggregator, global_state: dict[str, Tensor], callbacks: Iterable[object] = ()
    ) -> None:
        waiting = [type(cb).__name__ for cb in callbacks if wants_every_update(cb)]
        self.streaming = aggregator.streaming and not waiting
        if self.streaming:
            _say_once(aggregator, "streams", "%s streams: each client update is folded as it arrives, then dropped")
        elif aggregator.streaming:
            _say_once(
                aggregator,
                "hook",
                "%s could stream, but %s implement(s) on_before_aggregate, which receives every update: the server "
                "buffers every client update until the round ends (one adapter per client)",
                ", ".join(waiting),
            )
        else:
            _say_once(
                aggregator,
                "buffers",
                "%s needs every update at once: the server buffers every client update until the round ends (one "
                "adapter per client)",
            )
        self.accumulator = aggregator.begin(global_state) if self.streaming else Buffer(aggregator, global_state)
        self.seconds = 0.0

    def add(self, update: ClientUpdate) -> ClientUpdate:
        """Fold ``update`` in; returns what the server keeps of it: its ``summary`` when streaming, else itself."""
        start = time.perf_counter()
        self.accumulator.fold(update)
        self.seconds += time.perf_counter() - start
        return summary(update) if self.streaming else update

    def finish(self) -> dict[str, Tensor]:
        """The new global state (once)."""
        start = time.perf_counter()
        new = self.accumulator.finish()
        self.seconds += time.perf_counter() - start
        return new
