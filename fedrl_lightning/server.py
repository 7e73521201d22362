"""The server: the round loop, selection, aggregation, the global adapter, retries, faults, logs and checkpoints.

``Server.fit`` is the only round loop of the project. It reaches the clients through a ``Transport``: the
in-process one calls ``Client.run_round`` directly, sharded over Fabric ranks (``fedrl_lightning.transport``), the
Flower one sends messages to SuperNodes (``fedrl_lightning.flower.transport``). The server never knows which: it
selects among the transport's participants, sends each its ``Downlink``, receives ``Reply`` objects, aggregates the
good ones in the order the transport returns them (each folded as it arrives when the aggregator streams, see
``aggregation.rounds``), retries a round short of ``min_clients`` and checkpoints itself and the transport's state
(the in-process client states) through Fabric after every round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger
from rich.console import Console
from rich.progress import Progress
from torch import Tensor

from fedrl_lightning import checkpoint, reporting, rundir
from fedrl_lightning.aggregation.base import Aggregator, ClientUpdate
from fedrl_lightning.aggregation.rounds import RoundAggregation
from fedrl_lightning.callbacks import fire, state_key
from fedrl_lightning.client import Downlink
from fedrl_lightning.comm import Channel
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.selection import UniformSelector
from fedrl_lightning.watch import StepLog

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One selected participant's answer to a round: an update, or why there is none.

    Attributes:
        label: who, for logs and ``faults/<label>`` metrics (``client3``; ``node7`` while unknown).
        update: the update; None when the client failed.
        error: why it failed.
    """

    label: str
    update: ClientUpdate | None = None
    error: str = ""


class Transport(Protocol):
    """How the server reaches its clients. ``overhead``: seconds of the last ``train`` spent outside local training
    (state swaps, the channel, gathering across processes)."""

    overhead: float

    def participants(self) -> list[int]:
        """The ids the selector chooses a round's participants from."""
        ...

    def train(
        self, round_idx: int, downlink: Callable[[int], Downlink], ids: list[int], progress: Progress | None = None
    ) -> list[Reply]:
        """Run round ``round_idx`` on ``ids``, client ``c`` receiving ``downlink(c)``; the replies of the successful
        clients in a fixed order, failures anywhere. (A transport may also have ``stream``, the same one at a time.)"""
        ...

    def evaluate(self, round_idx: int, global_state: dict[str, Tensor] | None) -> dict[str, float]:
        """Held-out ``client<i>/eval/<metric>`` under ``global_state`` (None: each client's own adapter)."""
        ...

    def rollback(self, ids: list[int], last_checkpoint: Path | None) -> None:
        """Put the clients of a failed round attempt back to the state the round started from."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class TooFewClients(RuntimeError):
    """A round had fewer good replies than ``min_clients``: it is retried, then the run stops."""

    def __init__(self, message: str, client_ids: list[int]) -> None:
        super().__init__(message)
        self.client_ids = client_ids


def mean(values: Iterable[float]) -> float:
    """The mean, NaN for no values."""
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def with_means(metrics: dict[str, float]) -> dict[str, float]:
    """Per-client held-out metrics plus ``eval/accuracy_mean`` and ``eval/reward_mean`` over the clients."""
    for key in ("accuracy", "reward"):
        metrics[f"eval/{key}_mean"] = mean(v for k, v in metrics.items() if k.endswith(f"/eval/{key}"))
    return metrics


class Server:
    """Runs the federation's rounds over a transport; its state is everything the server knows.

    Args:
        fabric: the Fabric checkpoints are saved and loaded through (rank 0 writes).
        aggregation: the aggregator; None = local-only training (nothing aggregated or sent).
        selector: which participants train each round.
        num_rounds: rounds in the run.
        callbacks: hook objects (the server fires every hook but the two client-side ones).
        comm: the byte ledger the transport counts into.
        loggers: Lightning loggers that receive each round's metrics.
        checkpoint_dir: where round checkpoints go; None = none.
        keep_checkpoints: how many to keep (the newest).
        min_clients: fewest good replies a round needs.
        round_retries: how often a round short of ``min_clients`` is retried before the run stops.
        eval_every: evaluate every this many rounds (and after the last); 0 = only after the last.
        eval_before_training: also evaluate before the first round (round 0).
        console: where the plan, round lines and progress go; None = quiet.
        log_every_n_steps: log the clients' local steps whose run index is a multiple of this (``watch.StepLog``).
        hook_context: extra keyword arguments for every hook (``trainer``, ``module`` in one process).
    """

    def __init__(
        self,
        fabric: Fabric,
        aggregation: Aggregator | None,
        selector: UniformSelector,
        num_rounds: int,
        callbacks: Sequence[object] = (),
        comm: Channel | None = None,
        loggers: Sequence[Logger] = (),
        checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int = 2,
        min_clients: int = 1,
        round_retries: int = 1,
        eval_every: int = 1,
        eval_before_training: bool = True,
        console: Console | None = None,
        log_every_n_steps: int = 1,
        hook_context: Mapping[str, object] | None = None,
    ) -> None:
        if num_rounds < 1 or min_clients < 1 or round_retries < 0:
            raise ValueError(
                f"need num_rounds >= 1, min_clients >= 1, round_retries >= 0, got "
                f"{num_rounds}, {min_clients}, {round_retries}"
            )
        self.fabric, self.aggregation, self.selector, self.num_rounds = fabric, aggregation, selector, num_rounds
        self.callbacks, self.comm, self.loggers = list(callbacks), comm or Channel(), list(loggers)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.keep_checkpoints, self.min_clients, self.round_retries = keep_checkpoints, min_clients, round_retries
        self.eval_every, self.eval_before_training = eval_every, eval_before_training
        self.console, self.hook_context = console, dict(hook_context or {})
        self.steps = StepLog(log_every_n_steps)  # the clients' per-step rows, written with each round's
        self.bar: Progress | None = None  # the progress display while fit runs (its task 0: the rounds)
        self.global_state: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.round_idx = 0
        self.stopped: str | None = None
        self.last_checkpoint: Path | None = None  # the state the next round starts from, for a retry
        self.settings: dict[str, Any] | None = None  # the run's settings, stored with each checkpoint (see rundir)
        self.finished_before = False  # the checkpoint resumed from had completed every round already
        self._written: list[Path] = []  # the checkpoints this run wrote (or resumed from): the only ones it prunes
        self._plan: tuple[str | None, Path | None] | None = None  # (ckpt_path, its checked checkpoint)

    def _fire(self, hook: str, **kwargs: Any) -> None:
        fire(self.callbacks, hook, **{**self.hook_context, "server": self, **kwargs})

    # -- the run -----------------------------------------------------------------------------------------------

    def fit(self, transport: Transport, initial_state: dict[str, Tensor], ckpt_path: str | None = "last") -> dict:
        """Run (or resume) the rounds; returns the last round's metrics.

        Args:
            transport: how the clients are reached.
            initial_state: the global adapter before the first round.
            ckpt_path: ``last`` resumes from the newest valid checkpoint in ``checkpoint_dir`` if there is one, a
                checkpoint directory resumes from it, None starts over.
        """
        self.global_state = dict(initial_state)
        self.resume(transport, ckpt_path)
        if self.round_idx and self.round_idx >= self.num_rounds:  # a rerun of a finished run changes nothing
            self.finished_before = True
            return self.history[-1] if self.history else {}
        self._fire("on_fit_start", round_idx=self.round_idx)
        if self.round_idx == 0 and self.eval_before_training:
            self._log(0, self.evaluate(0, transport))
        with reporting.progress_bar(self.console) as bar:
            self.bar = bar
            task = bar.add_task("rounds", total=self.num_rounds, completed=self.round_idx, done_before=self.round_idx)
            for r in range(self.round_idx + 1, self.num_rounds + 1):
                try:
                    metrics = self._round_with_retries(r, transport, bar)
                except StopFederation as stop:  # nothing of this round is kept: the last checkpoint stays valid
                    self._say(f"[bold red]stopped before round {r} completed:[/] {stop}")
                    log.error("stopped before round %d completed: %s", r, stop)
                    self.stopped = str(stop)
                    break
                self.round_idx = r
                self._log(r, metrics)
                if self.console is not None:
                    reporting.print_round(self.console, r, self.num_rounds, metrics)
                self._fire("on_round_end", round_idx=r, metrics=metrics)
                self.save_checkpoint(transport)  # after on_round_end: what callbacks did with the round is in it
                bar.update(task, completed=r)  # absolute: callbacks may have shown a fraction of the round
        self._fire("on_fit_end")
        return self.history[-1] if self.history else {}

    def _round_with_retries(self, r: int, transport: Transport, bar: Progress) -> dict[str, float]:
        """A round short of ``min_clients`` is retried from the clients' start states, then stops the run."""
        for attempt in range(self.round_retries + 1):
            try:
                return self._round(r, transport, bar)
            except TooFewClients as short:
                log.warning("round %d attempt %d: %s", r, attempt + 1, short)
                reason = str(short)
                transport.rollback(short.client_ids, self.last_checkpoint)
        raise StopFederation(f"round {r} failed {self.round_retries + 1} time(s): {reason}")

    def _round(self, r: int, transport: Transport, bar: Progress) -> dict[str, float]:
        self._fire("on_round_start", round_idx=r)
        self.steps.start_round()
        ids = self.selector.select(r, transport.participants())
        self._fire("on_clients_selected", round_idx=r, client_ids=ids)
        round_start = time.perf_counter()
        metrics: dict[str, float] = {}
        updates: list[ClientUpdate] = []  # what is kept of each update: a summary when the aggregator streams
        agg = self.begin_aggregation()  # streaming: replies one at a time from a transport's ``stream`` if it has one
        stream = getattr(transport, "stream", None) if agg is not None and agg.streaming else None
        for reply in (stream or transport.train)(r, partial(self.downlink, r), ids, bar):
            if reply.update is not None:
                self.steps.collect(r, reply.update)  # per-step metrics out before anyone sees the update
                self._fire("on_client_end", round_idx=r, client_id=reply.update.client_id, update=reply.update)
                updates.append(agg.add(reply.update) if agg is not None else reply.update)
            else:
                self._say(f"[yellow]round {r}: {reply.label} dropped: {reply.error}[/]")
                metrics[f"faults/{reply.label}"] = 1.0
            del reply  # a folded update's tensors are free before the next client's round
        metrics["faults/dropped"] = float(len(ids) - len(updates))
        self.require_enough(updates, ids)  # a short round drops its accumulator: the aggregator is unchanged
        overhead = transport.overhead
        if agg is not None:
            metrics.update(self.finish_aggregation(r, agg, updates))
            overhead += metrics["timing/aggregation"]
        for update in updates:  # after on_before_aggregate, which may add metrics (e.g. aggregation weights)
            metrics.update({f"client{update.client_id}/{k}": v for k, v in update.metrics.items()})
        # Swap, channel and aggregation time as a share of the round's training (evaluation excluded).
        metrics["timing/round_train"] = time.perf_counter() - round_start
        metrics["timing/federated_overhead"] = overhead / metrics["timing/round_train"]
        totals = self.comm.totals(r)
        metrics.update({"comm/bytes_down": totals["down"], "comm/bytes_up": totals["up"]})
        metrics["train/reward_mean"] = mean(u.metrics["reward"] for u in updates if "reward" in u.metrics)
        if self.is_eval_round(r):
            metrics.update(self.evaluate(r, transport))
        return metrics

    def require_enough(self, updates: list[ClientUpdate], ids: list[int]) -> None:
        """Raise ``TooFewClients`` unless ``min_clients`` of the selected ``ids`` (or all of them) replied."""
        if len(updates) < min(self.min_clients, len(ids)):
            raise TooFewClients(f"{len(updates)} of {len(ids)} clients replied, min_clients={self.min_clients}", ids)

    def downlink(self, r: int, client_id: int) -> Downlink:
        """What ``client_id`` receives for round ``r``: the global adapter and the aggregator's client-side tensors
        (the same for every client); a personalized aggregator's tensors for this client alone; nothing for
        local-only training."""
        if self.aggregation is None:
            return Downlink(r, None)
        if self.aggregation.personalized:
            return Downlink(r, None, self.aggregation.client_downlink(client_id, r, self.num_rounds), personal=True)
        return Downlink(r, self.global_state, self.aggregation.downlink(self.global_state))

    def shared_state(self) -> dict[str, Tensor] | None:
        """The global adapter, which every client deploys; None when each keeps its own (local-only, personalized)."""
        return None if self.aggregation is None or self.aggregation.personalized else self.global_state

    def begin_aggregation(self) -> RoundAggregation | None:
        """This round's aggregation: streaming or buffered (``aggregation.rounds``); None for local-only training."""
        aggregation, state = self.aggregation, self.global_state
        return None if aggregation is None else RoundAggregation(aggregation, state, self.callbacks)

    def aggregate(self, r: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """The server's step on a whole round's updates (``begin_aggregation``, then ``finish_aggregation``)."""
        agg = self.begin_aggregation()
        return self.finish_aggregation(r, agg, [agg.add(u) for u in updates])

    def finish_aggregation(self, r: int, agg: RoundAggregation, updates: list[ClientUpdate]) -> dict[str, float]:
        """``on_before_aggregate`` (summaries when streaming), the new global adapter, ``on_after_aggregate``."""
        self._fire("on_before_aggregate", round_idx=r, updates=updates)
        self.global_state = agg.finish()
        metrics = {"timing/aggregation": agg.seconds, **self.aggregation.metrics()}
        self._fire("on_after_aggregate", round_idx=r, global_state=self.global_state)
        return metrics

    def evaluate(self, r: int, transport: Transport) -> dict[str, float]:
        """Every client's held-out metrics under the adapter it would deploy, and their means."""
        metrics = with_means(transport.evaluate(r, self.shared_state()))
        self._fire("on_evaluate_end", round_idx=r, metrics=metrics)
        return metrics

    def is_eval_round(self, r: int) -> bool:
        """Whether round ``r`` ends with an evaluation."""
        return bool(self.eval_every and r % self.eval_every == 0) or r == self.num_rounds

    # -- state -------------------------------------------------------------------------------------------------

    def save_checkpoint(self, transport: Transport) -> None:
        """The server's and the transport's state after ``round_idx`` rounds, atomically (rank 0 writes)."""
        if self.checkpoint_dir is None:
            return
        state = {"server": self, "clients": transport}
        final = checkpoint.round_path(self.checkpoint_dir, self.round_idx)
        mine = [p for p in self._written if p != final] + [final]
        meta = {"settings": self.settings} if self.settings is not None else None
        self.last_checkpoint = checkpoint.save(
            self.checkpoint_dir, self.round_idx, self.fabric, state, mine[: -self.keep_checkpoints], meta
        )
        self._written = mine[-self.keep_checkpoints :]
        if self.fabric.is_global_zero:
            size = sum(f.stat().st_size for f in final.iterdir())
            log.info("round %d checkpoint: %s, %.2f MB", self.round_idx, final, size / 1e6)

    def plan_resume(self, ckpt_path: str | None) -> Path | None:
        """The checkpoint ``fit(ckpt_path)`` would resume from, once the run may use it (``rundir.resume_point``).
        Kept until ``resume`` uses it: finding and checking it hashes checkpoints, which a caller checking early (the
        trainer, before building the model) need not pay twice."""
        if self.checkpoint_dir is None:
            return None
        if self._plan is None or self._plan[0] != ckpt_path:
            self._plan = (ckpt_path, rundir.resume_point(self.checkpoint_dir, ckpt_path, self.settings))
        return self._plan[1]

    def resume(self, transport: Transport, ckpt_path: str | None) -> None:
        """Continue from a checkpoint (``ckpt_path`` as in ``fit``); loggers keep the rows of its rounds."""
        path = self.plan_resume(ckpt_path)
        self._plan = None  # used: a later fit looks again
        if path is None:
            return
        checkpoint.load(path, self.fabric, {"server": self, "clients": transport})
        self.last_checkpoint = path
        self._written = rundir.lineage(self.checkpoint_dir, path)
        for logger in self.loggers:
            if callable(getattr(logger, "resume", None)):
                logger.resume(self.history)
        self._say(f"Resuming from {path} after round {self.round_idx}")

    def state_dict(self) -> dict[str, Any]:
        """Everything the server needs to continue bit for bit."""
        return {
            "round": self.round_idx,
            "global_state": self.global_state,
            "aggregation": self.aggregation.state_dict() if self.aggregation is not None else None,
            "selector": getattr(self.selector, "state_dict", dict)(),
            "comm": self.comm.state_dict(),
            "history": self.history,
            "rng": checkpoint.rng_state(),
            "callbacks": {
                state_key(self.callbacks, i): cb.state_dict()
                for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None))
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``'s output. A callback without saved state starts fresh (and says so)."""
        self.round_idx, self.global_state, self.history = state["round"], state["global_state"], state["history"]
        if self.aggregation is not None and state["aggregation"] is not None:
            self.aggregation.load_state_dict(state["aggregation"])
        if callable(getattr(self.selector, "load_state_dict", None)):
            self.selector.load_state_dict(state["selector"])
        self.comm.load_state_dict(state["comm"])
        checkpoint.set_rng_state(state["rng"])
        for i, cb in enumerate(self.callbacks):
            key = state_key(self.callbacks, i)
            if key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][key])
            elif callable(getattr(cb, "load_state_dict", None)):
                log.warning("the checkpoint has no state for callback %s: it starts fresh", key)

    # -- outputs -----------------------------------------------------------------------------------------------

    def _log(self, r: int, metrics: dict[str, float]) -> None:
        self.history = [h for h in self.history if h["round"] != r] + [{"round": r, **metrics}]
        self._to_loggers(r, metrics)

    def _to_loggers(self, r: int, metrics: Mapping[str, float]) -> None:
        self.steps.flush(self.loggers)  # the round's local steps, before its row
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=r)
            logger.save()

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
