"""FederatedTrainer: Lightning Fabric, the round loop, hooks, evaluation, logs and checkpoints.

One base model is resident; a client's private state (adapter when not aggregated, optimizer state, RNG, data
cursor) is kept on CPU and swapped in around its round, so memory grows with adapter size x clients, not with
model size x clients. ``num_clients: 1`` is plain centralized GRPO; ``aggregation: null`` is local-only training.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedrl_lightning.aggregation import Aggregator, ClientUpdate
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.client import ClientState, evaluate, run_round
from fedrl_lightning.comm import Channel
from fedrl_lightning.data import ClientSampler, FederatedData
from fedrl_lightning.errors import StopFederation
from fedrl_lightning.plots import plot_run
from fedrl_lightning.rollout import RolloutBackend
from fedrl_lightning.rollout.hf import HFRollout
from fedrl_lightning.selection import UniformSelector

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


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
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        save_merged: also export the final global adapter merged into the base model.
        accelerator: Fabric accelerator (``cpu``, ``cuda``, ``auto``).
        devices: Fabric devices.
        precision: Fabric precision, e.g. ``32-true`` or ``bf16-mixed``.
        seed: seed of the client RNG streams and data sampling.
        progress: show a progress bar.
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
        resume: bool = True,
        save_merged: bool = False,
        accelerator: str = "cpu",
        devices: int = 1,
        precision: str = "32-true",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if num_rounds < 1 or local_steps < 1:
            raise ValueError(f"num_rounds and local_steps must be >= 1, got {num_rounds} and {local_steps}")
        self.num_rounds, self.local_steps = num_rounds, local_steps
        self.aggregation = aggregation
        self.selector = selector or UniformSelector(seed=seed)
        self.rollout = rollout or HFRollout()
        self.eval_every, self.eval_before_training, self.eval_batch_size = (
            eval_every,
            eval_before_training,
            eval_batch_size,
        )
        self.output_dir, self.resume, self.save_merged = Path(output_dir), resume, save_merged
        self.seed, self.progress = seed, progress
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._csv = CSVLogger(str(self.output_dir), name="", version="")
        self.fabric = L.Fabric(
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            callbacks=list(callbacks or []),
            loggers=[self._csv, TensorBoardLogger(str(self.output_dir), name="tensorboard", version="")],
        )
        self.comm = Channel()
        self.client_states: dict[int, ClientState] = {}
        self.global_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.round_idx = 0
        self.stopped: str | None = None
        self.console = Console(stderr=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoints" / "last.pt"

    # -- the run -----------------------------------------------------------------------------------------------

    def fit(self, module: Any, data: FederatedData) -> dict[str, float]:
        """Train ``module`` federatedly on ``data``; returns the last round's metrics."""
        fabric = self.fabric
        fabric.launch()
        fabric.seed_everything(self.seed)
        optimizer = module.configure_optimizers()
        self.module, self.optimizer = fabric.setup(module, optimizer)
        self.data = data
        data.prepare_data()
        data.setup("fit")  # build every client's split now, so bad data fails before any training
        self._fresh_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.global_state = module.trainable_state()
        self._initial_adapter = self.global_state
        self.client_states = {cid: self._new_client_state(cid) for cid in data.client_ids()}
        if self.resume and self.checkpoint_path.is_file():
            self._load_checkpoint()
            # The CSV logger rewrites metrics.csv from what it has seen: give it the rounds before the restart.
            for row in self.history:
                self._csv.log_metrics({k: v for k, v in row.items() if k != "round"}, step=row["round"])
            self.console.print(f"Resuming from {self.checkpoint_path} after round {self.round_idx}")
        self._print_plan(module)
        fabric.call("on_fit_start", trainer=self, module=module)
        if self.round_idx == 0 and self.eval_before_training:
            self._log(0, self._evaluate(0))
        with self._progress() as bar:
            task = bar.add_task("rounds", total=self.num_rounds, completed=self.round_idx)
            while self.round_idx < self.num_rounds:
                try:
                    metrics = self._run_round(self.round_idx + 1, bar)
                except StopFederation as stop:
                    # Nothing of this round is kept: the last checkpoint stays the valid state of the run.
                    self.console.print(f"[bold red]stopped before round {self.round_idx + 1} completed:[/] {stop}")
                    self.stopped = str(stop)
                    break
                self.round_idx += 1
                self._log(self.round_idx, metrics)
                self._print_round(self.round_idx, metrics)
                self._save_checkpoint()
                fabric.call("on_round_end", trainer=self, round_idx=self.round_idx, metrics=metrics)
                bar.update(task, advance=1)
        self._write_outputs()
        fabric.call("on_fit_end", trainer=self)
        return self.history[-1] if self.history else {}

    def _run_round(self, r: int, bar: Progress) -> dict[str, float]:
        fabric = self.fabric
        fabric.call("on_round_start", trainer=self, round_idx=r)
        client_ids = self.selector.select(r, self.data.client_ids())
        fabric.call("on_clients_selected", trainer=self, round_idx=r, client_ids=client_ids)
        metrics: dict[str, float] = {}
        updates: list[ClientUpdate] = []
        task = bar.add_task(f"round {r} clients", total=len(client_ids))
        for cid in client_ids:
            update = self._client_round(r, cid)
            metrics.update({f"client{cid}/{k}": v for k, v in update.metrics.items()})
            fabric.call("on_client_end", trainer=self, round_idx=r, client_id=cid, update=update)
            updates.append(update)
            bar.update(task, advance=1)
        bar.remove_task(task)
        if self.aggregation is not None:
            fabric.call("on_before_aggregate", trainer=self, round_idx=r, updates=updates)
            self.global_state = self.aggregation.aggregate(self.global_state, updates)
            metrics.update(getattr(self.aggregation, "metrics", dict)())
            fabric.call("on_after_aggregate", trainer=self, round_idx=r, global_state=self.global_state)
        totals = self.comm.totals(r)
        metrics.update({"comm/bytes_down": totals["down"], "comm/bytes_up": totals["up"]})
        metrics["train/reward_mean"] = _mean(v for k, v in metrics.items() if k.endswith("/reward"))
        if (self.eval_every and r % self.eval_every == 0) or r == self.num_rounds:
            metrics.update(self._evaluate(r))
        return metrics

    def _client_round(self, r: int, cid: int) -> ClientUpdate:
        """Swap client ``cid``'s private state in, run its local steps, swap it out, send its update up."""
        module, state = self.module, self.client_states[cid]
        self.fabric.call("on_client_start", trainer=self, round_idx=r, client_id=cid, module=module)
        if self.aggregation is not None:
            module.load_trainable_state(self.comm.send_down(r, cid, self.global_state))
        else:
            module.load_trainable_state(state.adapter if state.adapter is not None else self._initial_adapter)
        self.optimizer.load_state_dict(state.optimizer or self._fresh_optimizer)
        torch.set_rng_state(state.rng)
        sampler = ClientSampler(len(self.data.train_examples(cid)), self.seed, cid)
        sampler.load_state_dict(state.sampler)

        def on_step(step: int) -> None:
            self.fabric.call("on_local_step_end", trainer=self, round_idx=r, client_id=cid, module=module, step=step)

        prompts, tokens, metrics = run_round(
            self.fabric,
            module,
            self.optimizer,
            self.rollout,
            self.data.train_examples(cid),
            sampler,
            self.local_steps,
            on_step,
        )
        adapter = module.trainable_state()
        state.optimizer = copy.deepcopy(self.optimizer.state_dict())
        state.rng, state.sampler = torch.get_rng_state(), sampler.state_dict()
        if self.aggregation is None:
            state.adapter = adapter
        else:
            adapter = self.comm.send_up(r, cid, adapter)
        return ClientUpdate(cid, adapter, prompts, tokens, metrics)

    def _evaluate(self, r: int) -> dict[str, float]:
        """Each client's held-out accuracy and reward under the adapter it would deploy (global, or its own)."""
        metrics: dict[str, float] = {}
        for cid in self.data.client_ids():
            own = self.client_states[cid].adapter
            adapter = own if self.aggregation is None and own is not None else self.global_state
            self.module.load_trainable_state(adapter)
            result = evaluate(self.module, self.rollout, self.data.eval_examples(cid), self.eval_batch_size)
            metrics.update({f"client{cid}/eval/{k}": v for k, v in result.items()})
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
        return {
            "version": CHECKPOINT_VERSION,
            "round": self.round_idx,
            "global_state": self.global_state,
            "client_states": {cid: asdict(s) for cid, s in self.client_states.items()},
            "aggregation": self.aggregation.state_dict() if self.aggregation is not None else None,
            "comm": self.comm.state_dict(),
            "history": self.history,
        }

    def _save_checkpoint(self) -> None:
        """Atomic: write a temporary file, then rename, so a killed run never leaves a torn checkpoint."""
        if not self.fabric.is_global_zero:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.checkpoint_path}: unsupported checkpoint version {ckpt.get('version')}")
        unknown = set(ckpt["client_states"]) - set(self.client_states)
        if unknown:
            raise ValueError(f"{self.checkpoint_path}: clients {sorted(unknown)} are not in this run's data")
        self.round_idx, self.global_state, self.history = ckpt["round"], ckpt["global_state"], ckpt["history"]
        self.client_states.update({cid: ClientState(**s) for cid, s in ckpt["client_states"].items()})
        if self.aggregation is not None and ckpt["aggregation"] is not None:
            self.aggregation.load_state_dict(ckpt["aggregation"])
        self.comm.load_state_dict(ckpt["comm"])

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
        self._print_summary()

    def _print_round(self, r: int, metrics: dict[str, float]) -> None:
        if not self.progress:
            return
        line = f"round {r}/{self.num_rounds}: train reward {metrics['train/reward_mean']:.3f}"
        if "eval/accuracy_mean" in metrics:
            line += f", held-out accuracy {metrics['eval/accuracy_mean']:.3f}"
        line += f", sent {metrics['comm/bytes_down'] / 1e6:.2f} MB down / {metrics['comm/bytes_up'] / 1e6:.2f} MB up"
        self.console.print(line)

    def _print_plan(self, module: Any) -> None:
        """The federation and the batch geometry, printed once so a mis-sized run is obvious before it starts."""
        if not self.progress:
            return
        table = Table(title="clients")
        for col in ("client", "train", "held-out", "tasks"):
            table.add_column(col, justify="right" if col != "tasks" else "left")
        for row in self.data.describe():
            tasks = ", ".join(f"{k}:{v}" for k, v in row["task_counts"].items())
            table.add_row(str(row["client_id"]), str(row["n_train"]), str(row["n_eval"]), tasks)
        self.console.print(table)
        g = getattr(module, "num_generations", 1)
        per_step = getattr(module, "prompts_per_step", 0)
        agg = type(self.aggregation).__name__ if self.aggregation is not None else "none (local-only)"
        self.console.print(
            f"{self.num_rounds} rounds x {self.local_steps} local steps; {per_step} prompts x {g} generations "
            f"= {per_step * g} completions per step; aggregation {agg}; outputs in {self.output_dir}"
        )

    def _print_summary(self) -> None:
        evals = [h for h in self.history if "eval/accuracy_mean" in h]
        if not evals:
            return
        first, last = evals[0], evals[-1]
        table = Table(title=f"held-out accuracy (round {first['round']} -> {last['round']})")
        for col in ("client", "before", "after", "reward before", "reward after"):
            table.add_column(col, justify="right")
        for cid in self.data.client_ids():
            k = f"client{cid}/eval"
            table.add_row(
                str(cid),
                *(f"{h.get(f'{k}/{m}', float('nan')):.3f}" for m in ("accuracy", "reward") for h in (first, last)),
            )
        table.add_row("mean", *(f"{h[f'eval/{m}_mean']:.3f}" for m in ("accuracy", "reward") for h in (first, last)))
        self.console.print(table)
        self.console.print(f"outputs in {self.output_dir}")

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.progress,
            transient=False,
        )


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
