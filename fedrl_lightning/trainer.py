"""FederatedTrainer: Lightning Fabric, the round loop, hooks, client faults, evaluation, logs and checkpoints.

One base model is resident; a client's private state (adapter when not aggregated, optimizer state, RNG, data
cursor) is kept on CPU and swapped in around its round, so memory grows with adapter size x clients, not with
model size x clients. ``num_clients: 1`` is plain centralized GRPO; ``aggregation: null`` is local-only training.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from rich.progress import Progress

from fedrl_lightning import checkpoint, ranks, reporting
from fedrl_lightning.aggregation import Aggregator, ClientUpdate
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.client import ClientState, evaluate, run_round
from fedrl_lightning.comm import Channel
from fedrl_lightning.data import ClientSampler, FederatedData
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.packing import load_optimizer_state, pack_into, trim_heap
from fedrl_lightning.plots import plot_run
from fedrl_lightning.rollout import RolloutBackend
from fedrl_lightning.rollout.hf import HFRollout
from fedrl_lightning.selection import UniformSelector

log = logging.getLogger(__name__)
# The run directory holds config.yaml and checkpoints beside metrics.csv by design, and a resume replays the
# history into a fresh metrics.csv: Lightning's "directory exists and is not empty" warning says nothing here.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


class ClientFault(RuntimeError):
    """A client's round failed: it is dropped from the round, the others go on."""


class FederatedTrainer:
    """Runs federated rounds of local RL training and server-side aggregation on Lightning Fabric.

    Args:
        num_rounds: federated rounds.
        local_steps: local optimizer steps (each on a fresh rollout batch) per client per round.
        aggregation: the server aggregator (``class_path`` in YAML); null = local-only training (no communication).
        selector: which clients take part in each round.
        rollout: the generation backend.
        callbacks: objects with hook methods (see ``fedrl_lightning.callbacks.HOOKS``).
        eval_every: evaluate on every client's held-out split every this many rounds (0 = only at the end).
        eval_before_training: also evaluate before the first round (round 0 in the logs).
        eval_batch_size: prompts per generation call during evaluation.
        output_dir: where metrics.csv, TensorBoard logs, checkpoints, the plot and the adapter go.
        keep_checkpoints: how many round checkpoints to keep (the newest).
        client_timeout: seconds a client may take for its round; a slower client is dropped from the round (checked
            after each local step, so a step in progress finishes first). None = no limit.
        max_update_norm: drop an update whose L2 distance to the global adapter exceeds this. None = no limit.
        min_clients: fewest successful clients a round needs to aggregate.
        round_retries: how often a round short of ``min_clients`` is retried (from the same state) before the run
            stops with its last checkpoint.
        save_merged: also export the final global adapter merged into the base model.
        accelerator: Fabric accelerator (``cpu``, ``cuda``, ``auto``).
        devices: Fabric devices (processes per node). With more than one process in all, each round's clients are
            sharded over the ranks (gloo on CPU) and their updates gathered; the result does not depend on the
            number of ranks (see ``fedrl_lightning.ranks``).
        num_nodes: machines, each running ``devices`` processes.
        precision: Fabric precision, e.g. ``32-true`` or ``bf16-mixed``.
        seed: seed of the client RNG streams and data sampling.
        progress: show a progress bar and per-round lines.
    """

    def __init__(
        self,
        num_rounds: int = 3,
        local_steps: int = 1,
        aggregation: Aggregator | None = None,
        selector: UniformSelector | None = None,
        rollout: RolloutBackend | None = None,
        callbacks: list[Callback] | None = None,
        eval_every: int = 1,
        eval_before_training: bool = True,
        eval_batch_size: int = 32,
        output_dir: str = "runs/default",
        keep_checkpoints: int = 2,
        client_timeout: float | None = None,
        max_update_norm: float | None = None,
        min_clients: int = 1,
        round_retries: int = 1,
        save_merged: bool = False,
        accelerator: str = "cpu",
        devices: int = 1,
        num_nodes: int = 1,
        precision: str = "32-true",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if num_rounds < 1 or local_steps < 1:
            raise ValueError(f"num_rounds and local_steps must be >= 1, got {num_rounds} and {local_steps}")
        if min_clients < 1 or round_retries < 0:
            raise ValueError(f"min_clients must be >= 1 and round_retries >= 0, got {min_clients}, {round_retries}")
        self.num_rounds, self.local_steps = num_rounds, local_steps
        self.aggregation = aggregation
        self.selector = selector or UniformSelector(seed=seed)
        self.rollout = rollout or HFRollout()
        self.eval_every, self.eval_before_training = eval_every, eval_before_training
        self.eval_batch_size = eval_batch_size
        self.output_dir, self.keep_checkpoints = Path(output_dir), keep_checkpoints
        self.client_timeout, self.max_update_norm = client_timeout, max_update_norm
        self.min_clients, self.round_retries = min_clients, round_retries
        self.save_merged, self.seed, self.progress = save_merged, seed, progress
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._csv = CSVLogger(str(self.output_dir), name="", version="")
        strategy: Any = "auto"
        if devices != 1 or num_nodes != 1:
            strategy = ranks.ClientParallelStrategy(process_group_backend="gloo" if accelerator == "cpu" else None)
        self.fabric = L.Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            callbacks=list(callbacks or []),
            loggers=[self._csv, TensorBoardLogger(str(self.output_dir), name="tensorboard", version="")],
        )
        self.comm = Channel()
        self._overhead = 0.0  # seconds of the current round spent outside local training (swap, channel, aggregation)
        self.client_states: dict[int, ClientState] = {}
        self._last_checkpoint: Path | None = None  # the saved or loaded state the next round starts from
        self.global_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.round_idx = 0
        self.stopped: str | None = None
        self.console = Console(stderr=True)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # -- the run -----------------------------------------------------------------------------------------------

    def fit(self, module: Any, data: FederatedData, ckpt_path: str | None = "last") -> dict[str, float]:
        """Train ``module`` federatedly on ``data``; returns the last round's metrics.

        Args:
            module: the policy module (e.g. ``GRPOModule``).
            data: the clients' data.
            ckpt_path: ``last`` resumes from the newest valid checkpoint in ``output_dir`` if there is one (a torn
                checkpoint is skipped); a checkpoint directory resumes from it; null starts over.
        """
        fabric = self.fabric
        self.setup(module, data, ckpt_path)
        if self.progress:
            reporting.print_plan(self.console, self, module, data)
        fabric.call("on_fit_start", trainer=self, module=module)
        if self.round_idx == 0 and self.eval_before_training:
            self._log(0, self._evaluate(0))
        with reporting.progress_bar(self.console, self.progress) as bar:
            task = bar.add_task("rounds", total=self.num_rounds, completed=self.round_idx)
            while self.round_idx < self.num_rounds:
                try:
                    metrics = self._run_round_with_retries(self.round_idx + 1, bar)
                except StopFederation as stop:
                    # Nothing of this round is kept: the last checkpoint stays the valid state of the run.
                    self.console.print(f"[bold red]stopped before round {self.round_idx + 1} completed:[/] {stop}")
                    self.stopped = str(stop)
                    break
                self.round_idx += 1
                self._log(self.round_idx, metrics)
                if self.progress:
                    reporting.print_round(self.console, self.round_idx, self.num_rounds, metrics)
                self.save_checkpoint()
                fabric.call("on_round_end", trainer=self, round_idx=self.round_idx, metrics=metrics)
                bar.update(task, advance=1)
        self._write_outputs()
        fabric.call("on_fit_end", trainer=self)
        return self.history[-1] if self.history else {}

    def setup(self, module: Any, data: FederatedData, ckpt_path: str | None = "last") -> None:
        """Launch the processes, set up ``module`` and its optimizer, build every client's state, and resume.

        ``fit`` calls it; a driver that runs rounds itself (e.g. a Flower app) calls it, then ``client_round`` and
        ``aggregate``.
        """
        fabric = self.fabric
        fabric.launch()
        fabric.seed_everything(self.seed)
        self.progress = self.progress and fabric.is_global_zero
        self.module, self.optimizer = fabric.setup(module, module.configure_optimizers())
        self.data = data
        data.prepare_data()
        data.setup("fit")  # build every client's split now, so bad data fails before any training
        self._fresh_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.global_state = self._initial_adapter = module.trainable_state()
        if not ranks.same_on_all_ranks(self.global_state, fabric.world_size):
            raise RuntimeError("the ranks built different initial adapters: seed the module the same on every rank")
        self.client_states = {cid: self._new_client_state(cid) for cid in data.client_ids()}
        resume_from = checkpoint.resolve(ckpt_path, self.checkpoint_dir)
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    def save_checkpoint(self) -> None:
        """The run's state after round ``round_idx`` (written by rank 0; every rank holds the same state)."""
        if self.fabric.is_global_zero:
            checkpoint.save(self.checkpoint_dir, self.round_idx, self.state_dict(), self.keep_checkpoints)
        self._last_checkpoint = checkpoint.round_path(self.checkpoint_dir, self.round_idx)

    def _run_round_with_retries(self, r: int, bar: Progress) -> dict[str, float]:
        """A round that misses ``min_clients`` is retried from the same client states, then stops the run."""
        # Before the first round no state has a packed block that a round could rewrite in place, so a shallow
        # snapshot keeps the start states; after it, they are the last checkpoint's (no second copy in memory).
        snapshot = {cid: replace(s) for cid, s in self.client_states.items()} if self.round_idx == 0 else None
        for attempt in range(self.round_retries + 1):
            try:
                return self._run_round(r, bar)
            except _TooFewClients as short:
                log.warning("round %d attempt %d: %s", r, attempt + 1, short)
                reason = str(short)
                if snapshot is not None:
                    self.client_states = {cid: replace(s) for cid, s in snapshot.items()}
                else:
                    self.client_states.update(self._checkpointed_client_states(r))
        raise StopFederation(f"round {r} failed {self.round_retries + 1} time(s): {reason}")

    def _checkpointed_client_states(self, r: int) -> dict[int, ClientState]:
        """The client states at the start of round ``r``: those of the checkpoint saved or resumed from before it."""
        path = self._last_checkpoint
        if path is None or not checkpoint.is_valid(path):
            raise StopFederation(f"round {r} cannot be retried: its start state {path} is missing or corrupt")
        return {cid: ClientState(**s) for cid, s in checkpoint.load(path)["client_states"].items()}

    def _run_round(self, r: int, bar: Progress) -> dict[str, float]:
        fabric = self.fabric
        fabric.call("on_round_start", trainer=self, round_idx=r)
        client_ids = self.selector.select(r, self.data.client_ids())
        fabric.call("on_clients_selected", trainer=self, round_idx=r, client_ids=client_ids)
        metrics: dict[str, float] = {}
        round_start, self._overhead = time.perf_counter(), 0.0
        results = self._train_clients(r, client_ids, bar)
        updates: list[ClientUpdate] = []
        for cid, result in results:  # on every rank, in the round's client order
            if isinstance(result, ClientUpdate):
                fabric.call("on_client_end", trainer=self, round_idx=r, client_id=cid, update=result)
                updates.append(result)
            else:
                self.console.print(f"[yellow]round {r}: client {cid} dropped: {result}[/]")
                metrics[f"faults/client{cid}"] = 1.0
        metrics["faults/dropped"] = float(len(client_ids) - len(updates))
        if len(updates) < min(self.min_clients, len(client_ids)):
            raise _TooFewClients(f"{len(updates)} of {len(client_ids)} clients replied, min_clients={self.min_clients}")
        if self.aggregation is not None:
            metrics.update(self.aggregate(r, updates))
        for update in updates:  # after on_before_aggregate, which may add metrics (e.g. aggregation weights)
            metrics.update({f"client{update.client_id}/{k}": v for k, v in update.metrics.items()})
        # Swap, channel and aggregation time as a share of the round's training (evaluation excluded).
        metrics["timing/round_train"] = time.perf_counter() - round_start
        metrics["timing/federated_overhead"] = self._overhead / metrics["timing/round_train"]
        totals = self.comm.totals(r)
        metrics.update({"comm/bytes_down": totals["down"], "comm/bytes_up": totals["up"]})
        metrics["train/reward_mean"] = _mean(u.metrics["reward"] for u in updates if "reward" in u.metrics)
        if (self.eval_every and r % self.eval_every == 0) or r == self.num_rounds:
            metrics.update(self._evaluate(r))
        return metrics

    def _train_clients(self, r: int, client_ids: list[int], bar: Progress) -> list[tuple[int, ClientUpdate | str]]:
        """Run this rank's share of the round's clients; every rank gets every result (update or error message).

        With several ranks, the changed client states and the clients' ledger rows are gathered too, so that all
        ranks hold the same run state after the round.
        """
        rank, world = self.fabric.global_rank, self.fabric.world_size
        mine = ranks.shard(client_ids, rank, world)
        results: dict[int, ClientUpdate | str] = {}
        task = bar.add_task(f"round {r} clients", total=len(mine))
        for cid in mine:
            try:
                results[cid] = self.client_round(r, cid)
            except Exception as err:  # a client failing must not take the federation down
                log.warning("round %d: client %d dropped: %s", r, cid, err, exc_info=not isinstance(err, ClientFault))
                results[cid] = str(err)
            bar.update(task, advance=1)
        bar.remove_task(task)
        if world == 1:
            return [(cid, results[cid]) for cid in client_ids]
        gather_start = time.perf_counter()
        states = {cid: self.client_states[cid] for cid in mine}
        rows = [row for row in self.comm.ledger() if row["round"] == r and row["client"] in states]
        gathered = ranks.all_gather_objects((results, states, rows), world)
        for other, (_, their_states, their_rows) in enumerate(gathered):
            if other != rank:
                self.client_states.update(their_states)
                self.comm.add_rows(their_rows)
        self._overhead += time.perf_counter() - gather_start
        return ranks.in_client_order(client_ids, [part[0] for part in gathered])

    def aggregate(self, r: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """The server's step: ``on_before_aggregate`` (it may set weights), the aggregator, ``on_after_aggregate``."""
        fabric, metrics = self.fabric, {}
        fabric.call("on_before_aggregate", trainer=self, round_idx=r, updates=updates)
        agg_start = time.perf_counter()
        self.global_state = self.aggregation.aggregate(self.global_state, updates)
        metrics["timing/aggregation"] = time.perf_counter() - agg_start
        self._overhead += metrics["timing/aggregation"]
        metrics.update(getattr(self.aggregation, "metrics", dict)())
        fabric.call("on_after_aggregate", trainer=self, round_idx=r, global_state=self.global_state)
        return metrics

    def client_round(self, r: int, cid: int) -> ClientUpdate:
        """Swap client ``cid``'s private state in, run its local steps, swap it out, send its update up.

        The client's stored state changes only when the round succeeds, so a failed round leaves it as it was.
        """
        module, state = self.module, self.client_states[cid]
        start = time.monotonic()
        self.fabric.call("on_client_start", trainer=self, round_idx=r, client_id=cid, module=module)
        swap_start = time.perf_counter()  # federated overhead: state swap in/out and the channel, around the training
        if self.aggregation is not None:
            start_adapter = self.comm.send_down(r, cid, self.global_state)
        else:
            start_adapter = state.adapter if state.adapter is not None else self._initial_adapter
        module.load_trainable_state(start_adapter)
        # Never aliased: the optimizer updates it in place, and the stored state changes only if the round succeeds.
        load_optimizer_state(self.optimizer, state.optimizer or self._fresh_optimizer)
        module.load_client_state(copy.deepcopy(state.extra.get("module", {})))
        client_extra = copy.deepcopy(state.extra)  # committed only if the round succeeds
        objective = None
        if self.aggregation is not None:
            objective = self.aggregation.local_objective(self.global_state, client_extra)
        if objective is not None and objective.down:
            objective.down = self.comm.send_down(r, cid, objective.down)
        torch.set_rng_state(state.rng)
        sampler = ClientSampler(len(self.data.train_examples(cid)), self.seed, cid)
        sampler.load_state_dict(state.sampler)

        def on_step(step: int) -> None:
            self.fabric.call("on_local_step_end", trainer=self, round_idx=r, client_id=cid, module=module, step=step)
            elapsed = time.monotonic() - start
            if self.client_timeout is not None and elapsed > self.client_timeout:
                raise ClientFault(f"timed out after {elapsed:.1f} s (client_timeout={self.client_timeout})")

        examples = self.data.train_examples(cid)
        train_start = time.perf_counter()
        prompts, tokens, metrics = run_round(
            self.fabric, module, self.optimizer, self.rollout, examples, sampler, self.local_steps, on_step, objective
        )
        train_end = time.perf_counter()
        extra = objective.finish(module.trainable_parameters()) if objective is not None else {}
        adapter = module.trainable_state()
        if self.max_update_norm is not None:
            norm = sum(float((adapter[k] - v).double().square().sum()) for k, v in start_adapter.items()) ** 0.5
            if not math.isfinite(norm):
                raise ClientFault(f"non-finite update (norm {norm})")
            if norm > self.max_update_norm:
                raise ClientFault(f"update norm {norm:.3g} exceeds max_update_norm={self.max_update_norm}")
        if self.aggregation is not None:
            adapter = self.comm.send_up(r, cid, adapter)  # rejects NaN/Inf
            extra = {k: self.comm.send_up(r, cid, v) if isinstance(v, dict) else v for k, v in extra.items()}
        # Scalars a task-aware server may use: the client's task family and its accuracy on this round's rollouts.
        extra.setdefault("task", Counter(ex.get("task", "default") for ex in examples).most_common(1)[0][0])
        if "accuracy" in metrics:
            extra.setdefault("accuracy", metrics["accuracy"])
        # State resident for the whole run is one block per client, rewritten in place from the second round on
        # (see ``packing``).
        if self.aggregation is None:
            state.optimizer, state.adapter = pack_into(
                (self.optimizer.state_dict(), adapter), (state.optimizer, state.adapter)
            )
            # The update reads the stored adapter through views of its own (no copy held until the round ends):
            # whoever keeps the update past the round keeps the block's storage referenced, and the next round then
            # writes a fresh block instead of changing what they hold.
            adapter = {k: v.view(v.shape) for k, v in state.adapter.items()}
        else:
            state.optimizer = pack_into(self.optimizer.state_dict(), state.optimizer)
        state.rng, state.sampler = torch.get_rng_state(), sampler.state_dict()
        client_extra["module"] = module.client_state()
        state.extra = client_extra
        trim_heap()  # the round's transients are gone: give their pages back before the next client's
        self._overhead += (train_start - swap_start) + (time.perf_counter() - train_end)
        return ClientUpdate(cid, adapter, prompts, tokens, metrics, extra=extra)

    def _evaluate(self, r: int) -> dict[str, float]:
        """Each client's held-out accuracy and reward under the adapter it would deploy (global, or its own)."""
        metrics: dict[str, float] = {}
        world = self.fabric.world_size
        trim_heap()
        for cid in ranks.shard(self.data.client_ids(), self.fabric.global_rank, world):  # greedy: any rank, same result
            own = self.client_states[cid].adapter
            adapter = own if self.aggregation is None and own is not None else self.global_state
            self.module.load_trainable_state(adapter)
            result = evaluate(self.module, self.rollout, self.data.eval_examples(cid), self.eval_batch_size)
            metrics.update({f"client{cid}/eval/{k}": v for k, v in result.items()})
        if world > 1:
            metrics = {k: v for part in ranks.all_gather_objects(metrics, world) for k, v in part.items()}
        for key in ("accuracy", "reward"):
            metrics[f"eval/{key}_mean"] = _mean(v for k, v in metrics.items() if k.endswith(f"/eval/{key}"))
        self.fabric.call("on_evaluate_end", trainer=self, round_idx=r, metrics=metrics)
        return metrics

    # -- state -------------------------------------------------------------------------------------------------

    def _new_client_state(self, cid: int) -> ClientState:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1_000_003 + cid)
            rng = torch.get_rng_state()
        sampler = ClientSampler(len(self.data.train_examples(cid)), self.seed, cid)
        return ClientState(sampler=sampler.state_dict(), rng=rng)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit for bit."""
        return {
            "round": self.round_idx,
            "global_state": self.global_state,
            # Not dataclasses.asdict, which deep-copies every client's tensors (2x their memory at each checkpoint).
            "client_states": {
                cid: {f.name: getattr(s, f.name) for f in fields(s)} for cid, s in self.client_states.items()
            },
            "aggregation": self.aggregation.state_dict() if self.aggregation is not None else None,
            "selector": getattr(self.selector, "state_dict", dict)(),
            "comm": self.comm.state_dict(),
            "history": self.history,
            "rng": checkpoint.rng_state(),
            "callbacks": [getattr(cb, "state_dict", dict)() for cb in self.fabric._callbacks],
        }

    def _load_checkpoint(self, path: Path) -> None:
        ckpt = checkpoint.load(path)
        self._last_checkpoint = path
        unknown = set(ckpt["client_states"]) - set(self.client_states)
        if unknown:
            raise ValueError(f"{path}: clients {sorted(unknown)} are not in this run's data")
        self.round_idx, self.global_state, self.history = ckpt["round"], ckpt["global_state"], ckpt["history"]
        self.client_states.update({cid: ClientState(**s) for cid, s in ckpt["client_states"].items()})
        if self.aggregation is not None and ckpt["aggregation"] is not None:
            self.aggregation.load_state_dict(ckpt["aggregation"])
        if hasattr(self.selector, "load_state_dict"):
            self.selector.load_state_dict(ckpt["selector"])
        self.comm.load_state_dict(ckpt["comm"])
        checkpoint.set_rng_state(ckpt["rng"])
        for cb, state in zip(self.fabric._callbacks, ckpt["callbacks"]):
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(state)
        # The CSV logger rewrites metrics.csv from what it has seen: give it the rounds before the restart.
        for row in self.history:
            self._csv.log_metrics({k: v for k, v in row.items() if k != "round"}, step=row["round"])
        self.console.print(f"Resuming from {path} after round {self.round_idx}")

    # -- outputs -----------------------------------------------------------------------------------------------

    def _log(self, r: int, metrics: dict[str, float]) -> None:
        self.history = [h for h in self.history if h["round"] != r] + [{"round": r, **metrics}]
        self.fabric.log_dict(metrics, step=r)
        for logger in self.fabric.loggers:
            logger.save()

    def _write_outputs(self) -> None:
        if not self.fabric.is_global_zero:
            return
        if self.aggregation is not None:
            self.module.save_adapter(self.output_dir / "adapter", self.global_state)
            if self.save_merged:
                self.module.save_merged(self.output_dir / "merged", self.global_state)
        else:
            for cid, state in self.client_states.items():
                if state.adapter is not None:
                    self.module.save_adapter(self.output_dir / "adapters" / f"client{cid}", state.adapter)
        plot_run(self.history, self.output_dir / "curves.png")
        if self.progress:
            reporting.print_summary(self.console, self.history, self.data.client_ids())
            self.console.print(f"outputs in {self.output_dir}")


class _TooFewClients(RuntimeError):
    pass


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
