"""A Flower strategy that is our server: our selector, aggregators, hooks, fault rules and checkpoints.

``FedRLStrategy`` implements Flower's message-based ``Strategy`` and replaces its ``start`` loop by one that resumes:
after every round it saves a checkpoint with ``fedrl_lightning.checkpoint`` (the keys of ``FederatedTrainer``'s,
with ``client_states`` empty: client state stays on the clients), and a restarted ServerApp continues after the
newest valid one. Any aggregator works through ``aggregate(global_state, updates)``; one with a client side sends
its ``LocalObjective.down`` tensors with the global adapter (``objective``), and the side information its clients
return (``ClientUpdate.extra``) comes back with their updates.

Differences from the in-process loop: clients are chosen among the connected SuperNodes (our seeded selector over
the sorted node ids), replies are aggregated in client-id order (the in-process order), evaluation replies are not
in the byte ledger (the in-process run evaluates locally), and only ``on_before_aggregate`` and
``on_after_aggregate`` fire on the server (``hooks``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedrl_lightning import checkpoint
from fedrl_lightning.aggregation import Aggregator, ClientUpdate
from fedrl_lightning.comm import Channel
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.flower import records
from fedrl_lightning.flower.hooks import ServerView, before_aggregate, call_hook
from fedrl_lightning.selection import UniformSelector

log = logging.getLogger(__name__)


class TooFewClients(RuntimeError):
    """A round had fewer good replies than ``min_clients``: it is retried, then the run stops."""


class FedRLStrategy(Strategy):
    """Runs fedrl-lightning's server side on Flower's Message API.

    Args:
        aggregation: our aggregator (any of ``fedrl_lightning.aggregation``).
        callbacks: server-side hook objects (e.g. ``RelativeGainWeighting``).
        selector: which SuperNodes train each round (seeded by round); default all.
        checkpoint_dir: where round checkpoints go; None = no checkpoints.
        keep_checkpoints: how many to keep (the newest).
        ckpt_path: ``last`` = resume from the newest valid checkpoint in ``checkpoint_dir`` (if any), a checkpoint
            directory, or None = start over.
        min_available_nodes: SuperNodes a round waits for.
        node_wait_timeout: seconds to wait for them before the run stops.
        min_clients: fewest good replies a round needs.
        round_retries: how often a round short of ``min_clients`` is retried before the run stops.
        eval_every: federated evaluation every this many rounds (and after the last); 0 = only after the last.
        eval_before_training: also evaluate the initial adapter (round 0).
        dtypes: the global adapter's dtypes on the server (the module's); None = as received (float32).
        loggers: Lightning loggers (``log_metrics(metrics, step)``) that get every round's metrics.
    """

    def __init__(
        self,
        aggregation: Aggregator,
        callbacks: Sequence[Any] = (),
        selector: UniformSelector | None = None,
        checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int = 2,
        ckpt_path: str | None = "last",
        min_available_nodes: int = 1,
        node_wait_timeout: float = 600.0,
        min_clients: int = 1,
        round_retries: int = 1,
        eval_every: int = 1,
        eval_before_training: bool = False,
        dtypes: Mapping[str, torch.dtype] | None = None,
        loggers: Sequence[Any] = (),
    ) -> None:
        if aggregation is None:
            raise ValueError(
                "a Flower run needs an aggregator (trainer.aggregation); local-only training has no server"
            )
        if min_available_nodes < 1 or min_clients < 1 or round_retries < 0:
            raise ValueError("need min_available_nodes >= 1, min_clients >= 1 and round_retries >= 0")
        self.aggregation, self.callbacks = aggregation, list(callbacks)
        self.selector = selector or UniformSelector()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.keep_checkpoints, self.ckpt_path = keep_checkpoints, ckpt_path
        self.min_available_nodes, self.node_wait_timeout = min_available_nodes, node_wait_timeout
        self.min_clients, self.round_retries = min_clients, round_retries
        self.eval_every, self.eval_before_training = eval_every, eval_before_training
        self.dtypes, self.loggers = dict(dtypes or {}), list(loggers)
        self.comm = Channel()
        self.global_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.round_idx, self.num_rounds = 0, 1
        self.node_clients: dict[int, int] = {}  # learnt from replies: which client each SuperNode is
        self.stopped: str | None = None
        self._sent: dict[int, int] = {}  # node -> bytes sent to it this round

    # -- Flower's Strategy interface ---------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the server's configuration."""
        log.info(
            "fedrl-lightning strategy: aggregation %s, selector %s, min_available_nodes %d, min_clients %d",
            type(self.aggregation).__name__,
            type(self.selector).__name__,
            self.min_available_nodes,
            self.min_clients,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The selected SuperNodes' train messages: global adapter, config (with ``server-round``), objective."""
        selected = self.selector.select(server_round, self.wait_for_nodes(grid))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "server-round": server_round})})
        objective = self.aggregation.local_objective(self.global_state, {})
        if objective is not None and objective.down:
            content["objective"] = records.to_record(objective.down)
        size = records.content_bytes(content)
        self._sent = dict.fromkeys(selected, size)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in selected]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Our server step on the good replies, in client-id order; returns the new global adapter and metrics.

        Raises:
            TooFewClients: fewer good replies than ``min_clients`` (nothing has changed then).
        """
        updates, metrics = self._collect(server_round, replies)
        if len(updates) < min(self.min_clients, len(self._sent)):
            raise TooFewClients(f"{len(updates)} of {len(self._sent)} clients replied, min_clients={self.min_clients}")
        view = ServerView(self.aggregation, self.global_state, self.comm, self.round_idx, self.num_rounds)
        before_aggregate(self.callbacks, view, server_round, updates)
        start = time.perf_counter()
        self.global_state = self.aggregation.aggregate(self.global_state, updates)
        metrics["timing/aggregation"] = time.perf_counter() - start
        metrics.update(getattr(self.aggregation, "metrics", dict)())
        view.global_state = self.global_state
        call_hook(
            self.callbacks, "on_after_aggregate", trainer=view, round_idx=server_round, global_state=self.global_state
        )
        for update in updates:  # after on_before_aggregate, which may add metrics (e.g. aggregation weights)
            metrics.update({f"client{update.client_id}/{k}": v for k, v in update.metrics.items()})
        totals = self.comm.totals(server_round)
        metrics.update({"comm/bytes_down": totals["down"], "comm/bytes_up": totals["up"]})
        metrics["train/reward_mean"] = _mean(u.metrics["reward"] for u in updates if "reward" in u.metrics)
        return records.to_record(self.global_state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every connected SuperNode evaluates the global adapter, in evaluation rounds only."""
        if not self.is_eval_round(server_round):
            return []
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "server-round": server_round})})
        nodes = self.wait_for_nodes(grid)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client held-out metrics (``client<i>/eval/...``) and their means, as the in-process trainer logs."""
        metrics: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            values = dict(msg.content["metrics"])
            cid = int(values.pop("client-id"))
            values.pop("num-examples", None)
            metrics.update({f"client{cid}/{k}": float(v) for k, v in values.items()})
        if not metrics:
            return None
        for key in ("accuracy", "reward"):
            metrics[f"eval/{key}_mean"] = _mean(v for k, v in metrics.items() if k.endswith(f"/eval/{key}"))
        return MetricRecord(metrics)

    # -- the loop ----------------------------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run (or resume) ``num_rounds`` rounds; checkpoint after each. ``evaluate_fn`` is not supported."""
        if evaluate_fn is not None:
            raise ValueError("FedRLStrategy evaluates on the clients; evaluate_fn is not supported")
        self.num_rounds = num_rounds
        received = records.from_record(initial_arrays)
        self.global_state = {k: v.to(self.dtypes.get(k, v.dtype)) for k, v in received.items()}
        resume_from = checkpoint.resolve(self.ckpt_path, self.checkpoint_dir) if self.checkpoint_dir else None
        if resume_from is not None:
            self.load_state_dict(checkpoint.load(resume_from))
            log.info("resuming from %s after round %d", resume_from, self.round_idx)
        self.summary()
        train_config, evaluate_config = train_config or ConfigRecord(), evaluate_config or ConfigRecord()
        if self.round_idx == 0 and self.eval_before_training:
            self._log(0, self._evaluate(0, grid, timeout, evaluate_config))
        while self.round_idx < num_rounds:
            try:
                metrics = self._round_with_retries(self.round_idx + 1, grid, timeout, train_config, evaluate_config)
            except StopFederation as stop:  # nothing of this round is kept: the last checkpoint stays valid
                log.error("stopped before round %d completed: %s", self.round_idx + 1, stop)
                self.stopped = str(stop)
                break
            self.round_idx += 1
            self._log(self.round_idx, metrics)
            if self.checkpoint_dir is not None:
                checkpoint.save(self.checkpoint_dir, self.round_idx, self.state_dict(), self.keep_checkpoints)
        rows = {int(row["round"]): MetricRecord({k: v for k, v in row.items() if k != "round"}) for row in self.history}
        return Result(arrays=records.to_record(self.global_state), train_metrics_clientapp=rows)

    def _round_with_retries(
        self, r: int, grid: Grid, timeout: float, train_config: ConfigRecord, evaluate_config: ConfigRecord
    ) -> dict[str, float]:
        """A round, retried from the same state while short of ``min_clients``; then its evaluation."""
        round_start = time.perf_counter()
        for attempt in range(self.round_retries + 1):
            messages = self.configure_train(r, records.to_record(self.global_state), train_config, grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            try:
                _, record = self.aggregate_train(r, replies)
                break
            except TooFewClients as short:
                log.warning("round %d attempt %d: %s", r, attempt + 1, short)
                reason = str(short)
        else:
            raise StopFederation(f"round {r} failed {self.round_retries + 1} time(s): {reason}")
        metrics = dict(record or {})
        metrics["timing/round_train"] = time.perf_counter() - round_start
        if self.is_eval_round(r):
            metrics.update(self._evaluate(r, grid, timeout, evaluate_config))
        return metrics

    def _evaluate(self, r: int, grid: Grid, timeout: float, config: ConfigRecord) -> dict[str, float]:
        messages = list(self.configure_evaluate(r, records.to_record(self.global_state), config, grid))
        return dict(self.aggregate_evaluate(r, grid.send_and_receive(messages, timeout=timeout)) or {})

    def _collect(self, r: int, replies: Iterable[Message]) -> tuple[list[ClientUpdate], dict[str, float]]:
        """Good replies as updates (client-id order) and fault metrics; the ledger records every message."""
        updates: dict[int, ClientUpdate] = {}
        metrics: dict[str, float] = {}
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            try:
                if msg.has_error():
                    raise RuntimeError(msg.error.reason)
                update = records.content_to_update(msg.content, self.global_state)
                if update.client_id in updates:
                    raise ValueError(f"a second node claims partition-id {update.client_id}")
            except (RuntimeError, ValueError, KeyError) as err:
                label = f"client{self.node_clients[node]}" if node in self.node_clients else f"node{node}"
                log.warning("round %d: %s dropped: %s", r, label, err)
                metrics[f"faults/{label}"] = 1.0
                self.comm.record(r, self.node_clients.get(node, -1), "down", self._sent.get(node, 0))
                continue
            self.node_clients[node] = update.client_id
            self.comm.record(r, update.client_id, "down", self._sent.get(node, 0))
            self.comm.record(r, update.client_id, "up", records.content_bytes(msg.content))
            updates[update.client_id] = update
        for node in set(self._sent) - answered:
            label = f"client{self.node_clients[node]}" if node in self.node_clients else f"node{node}"
            log.warning("round %d: %s did not reply in time", r, label)
            metrics[f"faults/{label}"] = 1.0
            self.comm.record(r, self.node_clients.get(node, -1), "down", self._sent[node])
        metrics["faults/dropped"] = float(len(self._sent) - len(updates))
        return [updates[cid] for cid in sorted(updates)], metrics

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected SuperNodes' ids (sorted), once at least ``min_available_nodes`` are connected.

        Raises:
            StopFederation: not enough SuperNodes within ``node_wait_timeout`` seconds.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise StopFederation(
                    f"{len(nodes)} of {self.min_available_nodes} SuperNodes connected after {self.node_wait_timeout} s"
                )
            time.sleep(1.0)
        return nodes

    def is_eval_round(self, r: int) -> bool:
        """Whether round ``r`` ends with a federated evaluation (as the in-process trainer decides)."""
        return bool(self.eval_every and r % self.eval_every == 0) or r == self.num_rounds

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The server's state after ``round_idx`` rounds, under ``FederatedTrainer.state_dict``'s keys."""
        return {
            "round": self.round_idx,
            "global_state": self.global_state,
            "client_states": {},  # on the clients' disks
            "aggregation": self.aggregation.state_dict(),
            "selector": getattr(self.selector, "state_dict", dict)(),
            "comm": self.comm.state_dict(),
            "history": self.history,
            "rng": checkpoint.rng_state(),
            "callbacks": [getattr(cb, "state_dict", dict)() for cb in self.callbacks],
            "node_clients": dict(self.node_clients),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``'s output."""
        self.round_idx, self.global_state, self.history = state["round"], state["global_state"], state["history"]
        if state["aggregation"] is not None:
            self.aggregation.load_state_dict(state["aggregation"])
        if hasattr(self.selector, "load_state_dict"):
            self.selector.load_state_dict(state["selector"])
        self.comm.load_state_dict(state["comm"])
        checkpoint.set_rng_state(state["rng"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        self.node_clients = dict(state.get("node_clients", {}))
        for row in self.history:  # loggers rewrite their files from what they have seen: replay the earlier rounds
            self._to_loggers(int(row["round"]), row)

    def _log(self, r: int, metrics: dict[str, float]) -> None:
        self.history = [h for h in self.history if h["round"] != r] + [{"round": r, **metrics}]
        self._to_loggers(r, metrics)

    def _to_loggers(self, r: int, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=r)
            logger.save()


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
