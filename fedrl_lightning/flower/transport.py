"""The Flower transport: the server reaches its clients as SuperNodes, through Flower's ``Grid`` (Message API).

A round is one ``train`` message per selected SuperNode (the global adapter, the round number and the aggregator's
client-side tensors, ``records``) and the replies back as ``ClientUpdate``; evaluation is one ``evaluate`` message
per connected SuperNode. The server selects among the connected nodes' ids; a reply says which client (partition)
the node is, and the successful replies are returned in client-id order, the order of the in-process run. Every
message is in the byte ledger as Flower counts it (``count_bytes``). Client states stay on the clients' disks, one
per round, so a retried round starts from the right state by itself (``rollback`` has nothing to do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.progress import Progress
from torch import Tensor

from fedrl_lightning.aggregation.base import ClientUpdate
from fedrl_lightning.client import Downlink
from fedrl_lightning.comm import Channel
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.flower import records
from fedrl_lightning.server import Reply

log = logging.getLogger(__name__)


class FlowerTransport:
    """Sends a round's messages to SuperNodes and turns their replies into ``Reply`` objects.

    Args:
        grid: Flower's grid of the running ServerApp.
        comm: the server's byte ledger.
        min_nodes: SuperNodes to wait for before each round.
        node_wait_timeout: seconds to wait for them before the run stops.
        round_timeout: seconds to wait for the replies of one round (or one evaluation).
    """

    def __init__(
        self,
        grid: Grid,
        comm: Channel,
        min_nodes: int = 1,
        node_wait_timeout: float = 600.0,
        round_timeout: float = 3600.0,
    ) -> None:
        self.grid, self.comm = grid, comm
        self.min_nodes, self.node_wait_timeout, self.round_timeout = min_nodes, node_wait_timeout, round_timeout
        self.node_clients: dict[int, int] = {}  # learnt from replies: which client each SuperNode is
        self.overhead = 0.0  # the round trip is the clients' time here: nothing to separate

    def participants(self) -> list[int]:
        """The connected SuperNodes' ids (sorted), once at least ``min_nodes`` are connected.

        Raises:
            StopFederation: not enough SuperNodes within ``node_wait_timeout`` seconds.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := sorted(self.grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise StopFederation(
                    f"{len(nodes)} of {self.min_nodes} SuperNodes connected after {self.node_wait_timeout} s"
                )
            time.sleep(1.0)
        return nodes

    def _label(self, node: int) -> str:
        return f"client{self.node_clients[node]}" if node in self.node_clients else f"node{node}"

    # -- training ----------------------------------------------------------------------------------------------

    def train_messages(self, down: Downlink, nodes: list[int]) -> list[Message]:
        """One ``train`` message per node: the global adapter, ``server-round``, the objective's tensors."""
        if down.global_state is None:
            raise ValueError("local-only training (aggregation: null) has no server: it cannot run on Flower")
        content = RecordDict(
            {"arrays": records.to_record(down.global_state), "config": ConfigRecord({"server-round": down.round_idx})}
        )
        if down.objective:
            content["objective"] = records.to_record(down.objective)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def train(self, down: Downlink, ids: list[int], progress: Progress | None = None) -> list[Reply]:
        messages = self.train_messages(down, ids)
        sent = self.sent_bytes(messages)
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout)
        return self.collect(down.round_idx, replies, sent, down.global_state)

    @staticmethod
    def sent_bytes(messages: Iterable[Message]) -> dict[int, int]:
        """Bytes each destination node is sent, as Flower counts them (for the ledger)."""
        return {m.metadata.dst_node_id: records.content_bytes(m.content) for m in messages}

    def collect(
        self, r: int, replies: Iterable[Message], sent: Mapping[int, int], like: Mapping[str, Tensor]
    ) -> list[Reply]:
        """The good replies as updates in client-id order, then one failed ``Reply`` per error or silent node; the
        ledger records every message (``sent``: bytes sent to each node)."""
        updates: dict[int, ClientUpdate] = {}
        failed: list[Reply] = []
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            try:
                if msg.has_error():
                    raise RuntimeError(msg.error.reason)
                update = records.content_to_update(msg.content, like)
                if update.client_id in updates:
                    raise ValueError(f"a second node claims partition-id {update.client_id}")
            except (RuntimeError, ValueError, KeyError) as err:
                failed.append(Reply(self._label(node), None, str(err)))
                self.comm.record(r, self.node_clients.get(node, -1), "down", sent.get(node, 0))
                continue
            self.node_clients[node] = update.client_id
            self.comm.record(r, update.client_id, "down", sent.get(node, 0))
            self.comm.record(r, update.client_id, "up", records.content_bytes(msg.content))
            updates[update.client_id] = update
        for node in sorted(set(sent) - answered):
            failed.append(Reply(self._label(node), None, "did not reply in time"))
            self.comm.record(r, self.node_clients.get(node, -1), "down", sent[node])
        return [Reply(f"client{cid}", updates[cid]) for cid in sorted(updates)] + failed

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate_messages(self, r: int, global_state: dict[str, Tensor], nodes: list[int]) -> list[Message]:
        """One ``evaluate`` message per node: the global adapter and ``server-round``."""
        content = RecordDict({"arrays": records.to_record(global_state), "config": ConfigRecord({"server-round": r})})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def evaluate(self, round_idx: int, global_state: dict[str, Tensor] | None) -> dict[str, float]:
        """Every connected SuperNode's held-out metrics under the global adapter (not in the byte ledger)."""
        if global_state is None:
            raise ValueError("local-only training (aggregation: null) cannot run on Flower")
        messages = self.evaluate_messages(round_idx, global_state, self.participants())
        return self.collect_evaluation(round_idx, self.grid.send_and_receive(messages, timeout=self.round_timeout))

    @staticmethod
    def collect_evaluation(r: int, replies: Iterable[Message]) -> dict[str, float]:
        """``client<i>/eval/<metric>`` from the evaluation replies; failures are logged and skipped."""
        metrics: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", r, msg.metadata.src_node_id, msg.error.reason)
                continue
            values = dict(msg.content["metrics"])
            cid = int(values.pop("client-id"))
            values.pop("num-examples", None)
            metrics.update({f"client{cid}/{k}": float(v) for k, v in values.items()})
        return metrics

    # -- state -------------------------------------------------------------------------------------------------

    def rollback(self, ids: list[int], last_checkpoint: Path | None) -> None:
        """Nothing to do: each client starts a round from its newest state saved before that round."""

    def state_dict(self) -> dict[str, Any]:
        return {"node_clients": dict(self.node_clients)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node_clients = dict(state.get("node_clients", {}))
