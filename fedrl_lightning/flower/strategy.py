"""``FedRLStrategy``: Flower's ``Strategy`` interface over our ``Server``, with no loop or retry logic of its own.

``start`` runs ``Server.fit`` over a ``FlowerTransport``: the same round loop, selection, aggregation, fault rules,
retries, logs and checkpoints as ``fedrl fit``, resumable after a restart. Flower's per-round methods are there for
code that drives a strategy itself: ``configure_train``/``configure_evaluate`` build the transport's messages,
``aggregate_train`` is the server's aggregation step on the replies, ``aggregate_evaluate`` their held-out metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedrl_lightning.flower import records
from fedrl_lightning.flower.transport import FlowerTransport
from fedrl_lightning.server import Server, with_means

log = logging.getLogger(__name__)


class FedRLStrategy(Strategy):
    """Runs our ``Server`` on Flower's Message API.

    Args:
        server: the server (aggregator, selector, callbacks, fault rules, checkpoints, loggers).
        ckpt_path: ``last`` = resume from the newest valid checkpoint (if any), a checkpoint directory, or None.
        min_available_nodes: SuperNodes a round waits for.
        node_wait_timeout: seconds to wait for them before the run stops.
        dtypes: the global adapter's dtypes on the server (the module's); None = as received (float32).
    """

    def __init__(
        self,
        server: Server,
        ckpt_path: str | None = "last",
        min_available_nodes: int = 1,
        node_wait_timeout: float = 600.0,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        if min_available_nodes < 1:
            raise ValueError(f"min_available_nodes must be >= 1, got {min_available_nodes}")
        self.server, self.ckpt_path = server, ckpt_path
        self.min_available_nodes, self.node_wait_timeout = min_available_nodes, node_wait_timeout
        self.dtypes = dict(dtypes or {})
        self.transport: FlowerTransport | None = None
        self._sent: dict[int, int] = {}

    def _transport(
        self, grid: Grid, timeout: float = 3600.0, adapter: Mapping[str, torch.Tensor] | None = None
    ) -> FlowerTransport:
        if self.transport is None or self.transport.grid is not grid:
            self.transport = FlowerTransport(
                grid, self.server.comm, self.min_available_nodes, self.node_wait_timeout, timeout, adapter
            )
        return self.transport

    def summary(self) -> None:
        """Log the server's configuration."""
        log.info(
            "fedrl-lightning strategy: aggregation %s, selector %s, min_available_nodes %d, min_clients %d",
            type(self.server.aggregation).__name__,
            type(self.server.selector).__name__,
            self.min_available_nodes,
            self.server.min_clients,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: object = None,
    ) -> Result:
        """Run (or resume) the server's rounds; ``num_rounds`` defaults to the server's. ``train_config``,
        ``evaluate_config`` and ``evaluate_fn`` are not supported (the YAML config is the configuration)."""
        if evaluate_fn is not None or train_config or evaluate_config:
            raise ValueError("FedRLStrategy takes its configuration from the YAML config: no train/evaluate configs")
        if num_rounds is not None:
            self.server.num_rounds = num_rounds
        received = records.from_record(initial_arrays)
        initial = {k: v.to(self.dtypes.get(k, v.dtype)) for k, v in received.items()}
        self.summary()
        self.server.fit(self._transport(grid, timeout, initial), initial, self.ckpt_path)
        history = self.server.history
        rows = {int(h["round"]): MetricRecord({k: v for k, v in h.items() if k != "round"}) for h in history}
        return Result(arrays=records.to_record(self.server.global_state), train_metrics_clientapp=rows)

    # -- Flower's per-round interface --------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        transport = self._transport(grid)
        nodes = self.server.selector.select(server_round, transport.participants())
        downs = transport.downlinks(lambda cid: self.server.downlink(server_round, cid), nodes)
        messages = transport.train_messages(downs)
        self._sent = FlowerTransport.sent_bytes(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server's aggregation step on the good replies (client-id order).

        Raises:
            fedrl_lightning.server.TooFewClients: fewer good replies than ``min_clients`` (nothing has changed then).
        """
        answers = self.transport.collect(server_round, replies, self._sent, self.server.global_state)
        updates = [a.update for a in answers if a.update is not None]
        self.server.require_enough(updates, sorted(self._sent))
        metrics = self.server.aggregate(server_round, updates)
        return records.to_record(self.server.global_state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.server.is_eval_round(server_round):
            return []
        transport = self._transport(grid)
        return transport.evaluate_messages(server_round, self.server.shared_state(), transport.participants())

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = FlowerTransport.collect_evaluation(server_round, replies)
        return MetricRecord(with_means(metrics)) if metrics else None
