"""The in-process transport: the server's clients live in this process, or are sharded over Fabric ranks.

Everything a client receives or sends goes through the byte-counting ``Channel`` (serialized, so nothing is shared
by accident; NaN/Inf rejected on the way up). With several Fabric ranks, each rank runs every ``world_size``-th
selected client (``ranks.shard``); the replies, the changed client states and their ledger rows are then gathered,
so every rank holds the same run state and aggregates the same updates in the same client order. In one process
each update is handed to the server as soon as its client is done, so a streaming aggregation holds one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.progress import Progress
from torch import Tensor

from fedrl_lightning import checkpoint, ranks
from fedrl_lightning.aggregation.base import ClientUpdate
from fedrl_lightning.client import Client, ClientFault, Downlink
from fedrl_lightning.client_state import ClientStateBank
from fedrl_lightning.comm import Channel
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.server import Reply

log = logging.getLogger(__name__)
_SCALAR_BYTES = 8  # a float64 or int64 sent up beside the tensors (e.g. FGRPO's gain)


def _reply(cid: int, result: ClientUpdate | str) -> Reply:
    if isinstance(result, ClientUpdate):
        return Reply(f"client{cid}", result)
    return Reply(f"client{cid}", None, result)


class InProcessTransport:
    """Calls ``Client.run_round`` for each selected client of this rank, through a counted channel.

    Args:
        client: runs any client's round on this process's resident module.
        comm: the server's byte ledger.
        eval_batch_size: prompts per generation call during evaluation.
    """

    def __init__(self, client: Client, comm: Channel, eval_batch_size: int = 32) -> None:
        self.client, self.comm, self.eval_batch_size = client, comm, eval_batch_size
        self.fabric = client.fabric
        self.overhead = 0.0
        self._channel_seconds = 0.0

    @property
    def bank(self) -> ClientStateBank:
        return self.client.bank

    def participants(self) -> list[int]:
        return self.client.data.client_ids()

    def train(
        self, round_idx: int, downlink: Callable[[int], Downlink], ids: list[int], progress: Progress | None = None
    ) -> list[Reply]:
        """This rank's share of ``ids`` (client ``c`` receives ``downlink(c)``); every rank returns every reply, in
        ``ids``' order."""
        return list(self.stream(round_idx, downlink, ids, progress))

    def stream(
        self, round_idx: int, downlink: Callable[[int], Downlink], ids: list[int], progress: Progress | None = None
    ) -> Iterator[Reply]:
        """``train``'s replies one at a time: in one process each as soon as its client is done, before the next
        client trains (the server's streaming aggregation folds it and lets it go); across ranks once they are
        gathered. ``overhead`` is set once the last is out."""
        rank, world = self.fabric.global_rank, self.fabric.world_size
        mine = ranks.shard(ids, rank, world)
        swap_before, self._channel_seconds = self.client.swap_seconds, 0.0
        task = progress.add_task(f"round {round_idx} clients", total=len(mine)) if progress else None
        results: dict[int, ClientUpdate | str] = {}
        try:
            for cid in mine:
                result = self._attempt(round_idx, cid, downlink)
                if progress is not None:
                    progress.update(task, advance=1)
                if world == 1:
                    reply = _reply(cid, result)
                    del result
                    yield reply
                    del reply  # nothing here holds the update while the next client trains
                else:
                    results[cid] = result
        finally:
            if progress is not None:
                progress.remove_task(task)
        self.overhead = self.client.swap_seconds - swap_before + self._channel_seconds
        if world > 1:
            ordered = self._gather(round_idx, ids, mine, results)[::-1]
            del results
            while ordered:  # popped: each update is freed once the server is done with it
                cid, result = ordered.pop()
                yield _reply(cid, result)

    def _attempt(self, round_idx: int, cid: int, downlink: Callable[[int], Downlink]) -> ClientUpdate | str:
        """Client ``cid``'s update, or why it failed."""
        down = downlink(cid)  # the server's side: an error there is not the client's
        try:
            return self._run(cid, down)
        except StopFederation:  # a client that finds the run itself broken (e.g. a reward failing everywhere)
            raise
        except Exception as err:  # a client failing must not take the federation down
            log.warning(
                "round %d: client %d dropped: %s",
                round_idx,
                cid,
                err,
                exc_info=not isinstance(err, ClientFault),
            )
            return str(err)

    def _run(self, cid: int, down: Downlink) -> ClientUpdate:
        """One client's round with everything it receives and sends going through the channel."""
        r, start = down.round_idx, time.perf_counter()
        if down.uploads:  # local-only training sends nothing either way
            sent = self.comm.send_down(r, cid, down.global_state) if down.global_state is not None else None
            down = replace(down, global_state=sent, objective=self.comm.send_down(r, cid, down.objective))
        self._channel_seconds += time.perf_counter() - start

        def uplink(update: ClientUpdate) -> ClientUpdate:
            if not down.uploads:
                return update
            start = time.perf_counter()
            update.state = self.comm.send_up(r, cid, update.state)  # rejects NaN/Inf
            for key, value in update.extra.items():
                if isinstance(value, Mapping):
                    update.extra[key] = self.comm.send_up(r, cid, value)
                elif isinstance(value, float) and key != "accuracy":  # an algorithm's scalar, e.g. FGRPO's gain
                    self.comm.record(r, cid, "up", _SCALAR_BYTES)
            self._channel_seconds += time.perf_counter() - start
            return update

        return self.client.run_round(cid, down, uplink)

    def _gather(
        self, r: int, ids: list[int], mine: list[int], results: dict[int, ClientUpdate | str]
    ) -> list[tuple[int, ClientUpdate | str]]:
        """Every rank's results, the client states they changed and their ledger rows, onto every rank."""
        start = time.perf_counter()
        world = self.fabric.world_size
        states = {cid: self.bank.get(cid, clone=True) for cid in mine}
        for result in results.values():  # a local-only update views its bank row: pickle the row, not the buffer
            if isinstance(result, ClientUpdate):
                result.state = {k: v.clone() for k, v in result.state.items()}
        rows = [row for row in self.comm.ledger() if row["round"] == r and row["client"] in states]
        gathered = ranks.all_gather_objects((results, states, rows), world)
        for other, (_, their_states, their_rows) in enumerate(gathered):
            if other != self.fabric.global_rank:
                for cid, state in their_states.items():
                    if state is not None:
                        self.bank.put(cid, state)
                self.comm.add_rows(their_rows)
        self.overhead += time.perf_counter() - start
        return ranks.in_client_order(ids, [part[0] for part in gathered])

    def evaluate(self, round_idx: int, global_state: dict[str, Tensor] | None) -> dict[str, float]:
        """Each client's held-out metrics under ``global_state``, or its own adapter (local-only); greedy, so any
        rank gives the same result: sharded like training."""
        metrics: dict[str, float] = {}
        world = self.fabric.world_size
        for cid in ranks.shard(self.participants(), self.fabric.global_rank, world):
            if not self.client.data.eval_examples(cid):
                continue  # no held-out set: not even its own adapter to read
            adapter = global_state if global_state is not None else self.client.own_adapter(cid)
            result = self.client.evaluate(cid, adapter, self.eval_batch_size)
            metrics.update({f"client{cid}/eval/{k}": v for k, v in result.items()})
        if world > 1:
            metrics = {k: v for part in ranks.all_gather_objects(metrics, world) for k, v in part.items()}
        return metrics

    def rollback(self, ids: list[int], last_checkpoint: Path | None) -> None:
        """The round's clients back to where it started: the last checkpoint's rows, or fresh before any.

        Raises:
            StopFederation: the checkpoint the round started from is gone or corrupt.
        """
        if last_checkpoint is None:
            self.bank.forget(ids)
            return
        if not checkpoint.is_valid(last_checkpoint):
            raise StopFederation(f"the round cannot be retried: its start {last_checkpoint} is missing or corrupt")
        self.bank.load_state_dict(checkpoint.load(last_checkpoint)["clients"], only=ids)

    def state_dict(self) -> dict[str, Any]:
        """The clients' states (what a checkpoint keeps beside the server's)."""
        return self.bank.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bank.load_state_dict(state)
