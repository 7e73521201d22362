"""FederatedTrainer: a federated run in one process (or over Fabric ranks), from one set of typed arguments.

It builds the three parts and lets the server run: a ``Client`` (the one resident model, every client's state in
a ``ClientStateBank``), the ``InProcessTransport`` that calls it through the byte-counting channel (sharded over
Fabric ranks when there are several), and the ``Server`` whose ``fit`` is the round loop. Then it writes the run's
outputs. ``num_clients: 1`` is plain centralized GRPO; ``aggregation: null`` is local-only training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

from lightning.fabric.strategies import Strategy
from rich.console import Console
from torch import Tensor

from fedrl_lightning import checkpoint, ranks, reporting, rundir
from fedrl_lightning.aggregation import Aggregator, ClientUpdate
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.callbacks.watch import CompletionsLog, StepProgress
from fedrl_lightning.client import Client, ClientFault
from fedrl_lightning.client_state import ClientState
from fedrl_lightning.comm import Channel
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules.pg import PolicyGradientModule
from fedrl_lightning.plots import plot_run
from fedrl_lightning.rollout import RolloutBackend
from fedrl_lightning.rollout.hf import HFRollout
from fedrl_lightning.selection import UniformSelector
from fedrl_lightning.server import Server
from fedrl_lightning.transport import InProcessTransport

__all__ = ["ClientFault", "FederatedTrainer"]


class ClientStates(Mapping[int, ClientState]):
    """Read-only view of every client's stored state (views of the bank's rows; fresh states for the untrained)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getitem__(self, cid: int) -> ClientState:
        if cid not in self.client.bank.rows:
            raise KeyError(cid)
        return self.client.state(cid)

    def __iter__(self) -> Iterator[int]:
        return iter(self.client.bank.rows)

    def __len__(self) -> int:
        return len(self.client.bank.rows)


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
        client_state_dir: where the clients' states (optimizer moments, own adapters) live between rounds: None in
            RAM; a directory keeps them in files there, with only the selected clients' rows in memory, for more
            clients than RAM holds (checkpoints then record the bank's version instead of copying it).
        accelerator: Fabric accelerator (``cpu``, ``cuda``, ``auto``).
        devices: Fabric devices (processes per node). With more than one process in all, each round's clients are
            sharded over the ranks (gloo on CPU) and their updates gathered; the result does not depend on the
            number of ranks (see ``fedrl_lightning.ranks``).
        num_nodes: machines, each running ``devices`` processes.
        precision: Fabric precision, e.g. ``32-true`` or ``bf16-mixed``.
        seed: seed of the client RNG streams and data sampling.
        progress: show a progress display (rounds, clients, local steps, with an ETA) and per-round lines.
        loggers: where metrics go, by name: ``csv`` (``metrics.csv``), ``tensorboard`` (``tensorboard/``), ``wandb``
            and ``mlflow`` (optional extras: ``pip install 'fedrl-lightning[wandb]'``; their usual environment
            variables apply, e.g. ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``; MLflow defaults to ``mlruns/`` here).
        log_every_n_steps: also log each client's local steps whose run index (``(round - 1) * local_steps + i +
            1``) is a multiple of this: rows with ``round``, ``client``, ``step`` in ``metrics.csv``,
            ``client<i>/step/<metric>`` elsewhere; written when their round completes. 0 = rounds only.
        log_completions_every: every this many local steps, append the step's completions (prompt, completion,
            reward per function, advantage) to ``completions.jsonl`` and, with ``progress``, print a table of them
            (as TRL's ``log_completions``). 0 = off.
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
        client_state_dir: str | None = None,
        accelerator: str = "cpu",
        devices: int = 1,
        num_nodes: int = 1,
        precision: str = "32-true",
        seed: int = 0,
        progress: bool = True,
        loggers: list[str] = ["csv", "tensorboard"],  # never mutated (copied below)
        log_every_n_steps: int = 1,
        log_completions_every: int = 0,
    ) -> None:
        if num_rounds < 1 or local_steps < 1:
            raise ValueError(f"num_rounds and local_steps must be >= 1, got {num_rounds} and {local_steps}")
        if eval_batch_size < 1 or keep_checkpoints < 1:
            raise ValueError(
                f"eval_batch_size and keep_checkpoints must be >= 1, got {eval_batch_size} and {keep_checkpoints}"
            )
        if min_clients < 1 or round_retries < 0:
            raise ValueError(f"min_clients must be >= 1 and round_retries >= 0, got {min_clients}, {round_retries}")
        if log_every_n_steps < 0 or log_completions_every < 0:
            raise ValueError(
                f"log_every_n_steps and log_completions_every must be >= 0, got {log_every_n_steps} and "
                f"{log_completions_every}"
            )
        self.num_rounds, self.local_steps, self.aggregation = num_rounds, local_steps, aggregation
        self.rollout = rollout or HFRollout()
        self.callbacks = list(callbacks or [])
        self.eval_batch_size = eval_batch_size
        self.client_timeout, self.max_update_norm = client_timeout, max_update_norm
        self.output_dir, self.save_merged, self.seed, self.progress = Path(output_dir), save_merged, seed, progress
        self.client_state_dir = client_state_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        strategy: Strategy | str = "auto"
        if devices != 1 or num_nodes != 1:
            strategy = ranks.ClientParallelStrategy(process_group_backend="gloo" if accelerator == "cpu" else None)
        self.console = Console(stderr=True)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = 120  # a log file: tables at full width, not cut at rich's default of 80
        # The trainer's own watchers run after the user's callbacks (and keep no state in checkpoints).
        self.hooks: list[Callback] = [*self.callbacks, *([StepProgress()] if progress else [])]
        if log_completions_every:
            console = self.console if progress else None
            self.hooks.append(CompletionsLog(self.output_dir, log_completions_every, console))
        self.logger_names = list(loggers)
        loggers = reporting.run_loggers(self.output_dir, self.logger_names)
        self.fabric = checkpoint.fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            loggers=loggers,
        )
        self.server = Server(
            self.fabric,
            aggregation,
            selector or UniformSelector(seed=seed),
            num_rounds,
            callbacks=self.hooks,
            comm=Channel(),
            loggers=loggers,
            checkpoint_dir=self.output_dir / "checkpoints",
            keep_checkpoints=keep_checkpoints,
            min_clients=min_clients,
            round_retries=round_retries,
            eval_every=eval_every,
            eval_before_training=eval_before_training,
            log_every_n_steps=log_every_n_steps,
            hook_context={"trainer": self},
        )
        self.client: Client | None = None
        self.transport: InProcessTransport | None = None
        self.config_yaml: str | None = None  # the CLI's resolved config, written once the output_dir is ours
        self._lock = rundir.RunLock(self.output_dir)

    # -- the run -----------------------------------------------------------------------------------------------

    def fit(
        self, module: PolicyGradientModule, data: FederatedData, ckpt_path: str | None = "last"
    ) -> dict[str, float]:
        """Train ``module`` federatedly on ``data``; returns the last round's metrics.

        Args:
            module: the policy module (e.g. ``GRPOModule``).
            data: the clients' data.
            ckpt_path: ``last`` resumes from the newest valid checkpoint in ``output_dir`` if there is one (a torn
                checkpoint is skipped); a checkpoint directory resumes from it; null starts over.
        """
        try:
            self.setup(module, data, ckpt_path)
            if self.progress:
                reporting.print_plan(self.console, self, module, data)
            self.server.fit(self.transport, self.client.initial_adapter, ckpt_path)
            self._write_outputs()
            for logger in self.server.loggers:  # flush and close (TensorBoard, an MLflow run's status)
                logger.finalize("success")
        finally:
            self._lock.release()
        return self.history[-1] if self.history else {}

    @property
    def settings(self) -> dict | None:
        """The run's settings (dotted keys, without those a resume may change) stored with each checkpoint: a
        resume with different ones is refused. The CLI sets them from the resolved config; None = not checked."""
        return self.server.settings

    @settings.setter
    def settings(self, value: dict | None) -> None:
        self.server.settings = value

    def setup(self, module: PolicyGradientModule, data: FederatedData, ckpt_path: str | None = "last") -> None:
        """Launch the processes, take the output directory (lock, resume check, ``config.yaml``), set up ``module``
        and its optimizer and the data, and build client and transport."""
        fabric = self.fabric
        fabric.launch()
        if fabric.is_global_zero:
            self._lock.acquire()  # before anything is written: a second run into this directory stops here
        self.server.plan_resume(ckpt_path)  # a refused resume fails before any model work
        if fabric.is_global_zero and self.config_yaml is not None:
            (self.output_dir / "config.yaml").write_text(self.config_yaml)
        fabric.seed_everything(self.seed)
        self.progress = self.progress and fabric.is_global_zero
        if not ranks.same_on_all_ranks(module.trainable_state(), fabric.world_size):
            raise RuntimeError("the ranks built different initial adapters: seed the module the same on every rank")
        self.client = Client.setup(
            fabric,
            module,
            data,
            self.rollout,
            self.aggregation,
            self.client_state_dir,
            self.server.keep_checkpoints,
            local_steps=self.local_steps,
            num_rounds=self.num_rounds,
            seed=self.seed,
            client_timeout=self.client_timeout,
            max_update_norm=self.max_update_norm,
            callbacks=self.hooks,
            hook_context={"trainer": self},
        )
        self.client.hook_context["module"] = self.client.module
        self.transport = InProcessTransport(self.client, self.server.comm, self.eval_batch_size)
        self.server.hook_context.update(self.client.hook_context)
        self.server.console = self.console if self.progress else None

    def client_round(self, round_idx: int, client_id: int) -> ClientUpdate:
        """One client's round outside the loop, as the server would send it (for inspection and tests).

        Raises:
            ClientFault: the client failed (its stored state is unchanged then).
        """
        reply = self.transport.train(round_idx, partial(self.server.downlink, round_idx), [client_id])[0]
        if reply.update is None:
            raise ClientFault(reply.error)
        return reply.update

    # -- what the run holds ------------------------------------------------------------------------------------

    @property
    def module(self) -> PolicyGradientModule:
        return self.client.module

    @property
    def data(self) -> FederatedData:
        return self.client.data

    @property
    def client_states(self) -> ClientStates:
        """Every client's stored state, by client id."""
        return ClientStates(self.client)

    @property
    def comm(self) -> Channel:
        """The run's byte ledger (the server's)."""
        return self.server.comm

    @property
    def global_state(self) -> dict[str, Tensor]:
        return self.server.global_state

    @property
    def history(self) -> list[dict[str, float]]:
        return self.server.history

    @property
    def round_idx(self) -> int:
        return self.server.round_idx

    @property
    def stopped(self) -> str | None:
        return self.server.stopped

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    # -- outputs -----------------------------------------------------------------------------------------------

    def _write_outputs(self) -> None:
        """The final adapter(s), the plot and the summary; nothing from a run that completed no round (or had
        completed every round before this call): the last checkpoint is what there is."""
        if not self.fabric.is_global_zero:
            return
        if self.server.finished_before:
            self.console.print(
                f"already finished at round {self.round_idx} (num_rounds {self.num_rounds}): nothing to do; outputs "
                f"in {self.output_dir} (raise --trainer.num_rounds to continue it)"
            )
            return
        if self.stopped and not self.progress:  # with progress on, the server has said it already
            where = f"round {self.round_idx} of {self.num_rounds}"
            self.console.print(f"[bold red]stopped after {where}:[/] {self.stopped}")
        if self.round_idx == 0:
            self.console.print(f"[bold red]no round completed: no adapter written[/] (outputs in {self.output_dir})")
            return
        module = self.client.module
        if self.server.shared_state() is not None:
            module.save_adapter(self.output_dir / "adapter", self.global_state)
            if self.save_merged:
                module.save_merged(self.output_dir / "merged", self.global_state)
        else:
            for cid in self.data.client_ids():
                own = self.client.bank.read("adapter", cid)
                if own is not None:
                    module.save_adapter(self.output_dir / "adapters" / f"client{cid}", own)
        plot_run(self.history, self.output_dir / "curves.png", self._step_rewards())
        if self.progress:
            ids = self.data.client_ids()
            sizes = {cid: len(self.data.eval_examples(cid)) for cid in ids}  # for the accuracies' intervals
            reporting.print_summary(self.console, self.history, ids, sizes)
            self.console.print(f"outputs in {self.output_dir}")

    def _step_rewards(self) -> list[tuple[int, int, float]]:
        """(client, step, reward) of the logged local steps: all in ``metrics.csv``, else this session's."""
        csv = next((lg for lg in self.server.loggers if isinstance(lg, reporting.MetricsCSV)), None)
        return csv.step_rewards() if csv is not None else list(self.server.steps.rewards)
