"""The Flower transport: the server reaches its clients as SuperNodes, through Flower's ``Grid`` (Message API).

A round is one ``train`` message per selected SuperNode, built from the server's downlink for the client that node
is (the global adapter, the round number and the aggregator's client-side tensors, ``records``; a personalized
aggregator's round has no global adapter and tensors of the client's own) and the replies back as ``ClientUpdate``;
evaluation is one ``evaluate`` message per connected SuperNode (without an adapter: each evaluates its own). The
server selects among the connected nodes' ids; which client (partition) a node is, the transport learns from its
replies, or asks it once (a ``query`` message) before it first sends it anything. The successful replies are
returned in client-id order, the order of the in-process run. Every train message and reply is in the byte ledger
as Flower counts it (``count_bytes``); queries and evaluations are not. Client states stay on the clients' disks,
one per round, so a retried round starts from the right state by itself (``rollback`` has nothing to do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
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
        adapter: the adapter's names and dtypes (the initial global adapter): what a reply's adapter is checked
            against and cast to when its round sent no global adapter (a personalized aggregator); None = as sent.
    """

    def __init__(
        self,
        grid: Grid,
        comm: Channel,
        min_nodes: int = 1,
        node_wait_timeout: float = 600.0,
        round_timeout: float = 3600.0,
        adapter: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.grid, self.comm, self.adapter = grid, comm, adapter
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

    def clients(self, nodes: list[int]) -> dict[int, int]:
        """Which client each node is: learnt from its replies, else asked once (a ``query`` message). A node that
        does not answer is left out."""
        unknown = [n for n in nodes if n not in self.node_clients]
        if unknown:
            content = RecordDict({"config": ConfigRecord({"query": "client-id"})})
            queries = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
            for msg in self.grid.send_and_receive(queries, timeout=self.round_timeout):
                node = msg.metadata.src_node_id
                if msg.has_error():
                    log.warning("node %d did not say which client it is: %s", node, msg.error.reason)
                    continue
                self.node_clients[node] = int(msg.content["metrics"]["client-id"])
        return {n: self.node_clients[n] for n in nodes if n in self.node_clients}

    # -- training ----------------------------------------------------------------------------------------------

    def downlinks(self, downlink: Callable[[int], Downlink], nodes: list[int]) -> dict[int, Downlink]:
        """Each node's downlink, by the client it is (``clients``); nodes that did not say are left out."""
        return {node: downlink(cid) for node, cid in self.clients(nodes).items()}

    @staticmethod
    def train_messages(downs: Mapping[int, Downlink]) -> list[Message]:
        """One ``train`` message per node: its global adapter (if any), ``server-round``, its objective's tensors.

        Raises:
            ValueError: a local-only round (nothing would be sent or received).
        """
        messages, arrays = [], {}
        for node, down in downs.items():
            if not down.uploads:
                raise ValueError("local-only training (aggregation: null) has no server: it cannot run on Flower")
            content = RecordDict()
            if down.global_state is not None:  # the same adapter for every node: one record
                key = id(down.global_state)
                if key not in arrays:
                    arrays[key] = records.to_record(down.global_state)
                content["arrays"] = arrays[key]
            content["config"] = ConfigRecord({"server-round": down.round_idx})
            if down.objective:
                content["objective"] = records.to_record(down.objective)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def train(
        self, round_idx: int, downlink: Callable[[int], Downlink], ids: list[int], progress: Progress | None = None
    ) -> list[Reply]:
        downs = self.downlinks(downlink, ids)
        messages = self.train_messages(downs)
        sent = self.sent_bytes(messages)
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []
        shared = next((d.global_state for d in downs.values() if d.global_state is not None), None)
        unnamed = [Reply(self._label(n), None, "did not say which client it is") for n in ids if n not in downs]
        return self.collect(round_idx, replies, sent, shared if shared is not None else self.adapter) + unnamed

    @staticmethod
    def sent_bytes(messages: Iterable[Message]) -> dict[int, int]:
        """Bytes each destination node is sent, as Flower counts them (for the ledger)."""
        return {m.metadata.dst_node_id: records.content_bytes(m.content) for m in messages}

    def collect(
        self, r: int, replies: Iterable[Message], sent: Mapping[int, int], like: Mapping[str, Tensor] | None
    ) -> list[Reply]:
        """The good replies as updates in client-id order (adapters checked against and cast to ``like``), then one
        failed ``Reply`` per error or silent node; the ledger records every message (``sent``: bytes sent to each
        node)."""
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

    @staticmethod
    def evaluate_messages(r: int, global_state: dict[str, Tensor] | None, nodes: list[int]) -> list[Message]:
        """One ``evaluate`` message per node: ``server-round`` and the global adapter (None: each node evaluates its
        client's own adapter, that of its newest saved state)."""
        content = RecordDict()
        if global_state is not None:
            content["arrays"] = records.to_record(global_state)
        content["config"] = ConfigRecord({"server-round": r})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def evaluate(self, round_idx: int, global_state: dict[str, Tensor] | None) -> dict[str, float]:
        """Every connected SuperNode's held-out metrics under the global adapter, or its own (not in the byte
        ledger)."""
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
