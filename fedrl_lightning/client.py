"""One client's round: swap its state in, rollouts -> rewards -> advantages -> local steps, swap it out, update up.

``Client`` runs any client's round on the one resident module. It owns everything a round touches on the client's
side: the private state (``ClientStateBank``: data cursor, optimizer state, RNG, algorithm state and, without
aggregation, its own adapter), the local steps, the aggregator's client-side objective, the fault checks on its
own update, and the client-side hooks. It knows nothing about how the round's inputs arrived or where its update
goes: the in-process transport calls it directly (``fedrl_lightning.transport``), the Flower ClientApp calls it per
message (``fedrl_lightning.flower.client_app``).
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor
from torch.optim import Optimizer

from fedrl_lightning.aggregation.base import Aggregator, ClientUpdate, LocalObjective
from fedrl_lightning.callbacks import fire
from fedrl_lightning.client_state import (
    ClientState,
    ClientStateBank,
    load_optimizer,
    optimizer_groups,
    optimizer_tensors,
)
from fedrl_lightning.data import ClientSampler, FederatedData
from fedrl_lightning.disk_bank import open_bank
from fedrl_lightning.losses import weighted_reward_sum
from fedrl_lightning.modules.pg import PolicyGradientModule, expand_columns
from fedrl_lightning.modules.policy import MetricTracker
from fedrl_lightning.rewards import TrainerState, compute_rewards, reward_inputs
from fedrl_lightning.rollout import RolloutBackend
from fedrl_lightning.schedule import position
from fedrl_lightning.watch import pack_steps, sample_rows


class ClientFault(RuntimeError):
    """A client's round failed: it is dropped from the round, the others go on."""


@dataclass
class Downlink:
    """What the server sends a client for one round.

    Attributes:
        round_idx: the round (1-based).
        global_state: the global adapter; None = the client starts from its own adapter (local-only training, or a
            personalized aggregator's round).
        objective: the aggregator's client-side tensors: ``Aggregator.downlink`` (e.g. SCAFFOLD's c, the same for
            every client) or a personalized aggregator's ``client_downlink`` (this client's own).
        personal: a personalized aggregator's round: no global adapter, but the client's adapter goes up at the end.
    """

    round_idx: int
    global_state: dict[str, Tensor] | None
    objective: dict[str, Tensor] = field(default_factory=dict)
    personal: bool = False

    @property
    def uploads(self) -> bool:
        """Whether the round's update leaves the client (False only for local-only training)."""
        return self.global_state is not None or self.personal


@contextmanager
def timed(tracker: MetricTracker, name: str) -> Iterator[None]:
    """Record the wall time of the block as ``timing/<name>`` (seconds)."""
    start = time.perf_counter()
    yield
    tracker.update(f"timing/{name}", time.perf_counter() - start)


def local_step(
    fabric: Fabric,
    module: PolicyGradientModule,
    optimizer: Optimizer,
    backend: RolloutBackend,
    examples: list[dict],
    objective: LocalObjective | None = None,
    samples: list[dict] | None = None,
) -> int:
    """One local step: generate, score, then the module's optimizer steps over that batch; returns completion tokens.

    Per optimizer step, after the backward passes and before clipping: the module's ``on_before_optimizer_step``
    (algorithm state such as FedMOA's objective weights) and the aggregator's ``objective`` (FedProx, SCAFFOLD).
    ``samples``, when given, receives the step's scored completions (``watch.sample_rows``).
    """
    t = module.tracker
    with timed(t, "generate"):
        rollout = backend.generate(module, [ex["prompt"] for ex in examples], module.sampling)
    with timed(t, "reward"):
        rewards = module.score(rollout, examples, module.num_generations)
    # Fabric autocasts only a wrapped module's forward, and these passes call other methods: the trainer's precision
    # (bf16-mixed, 16-mixed) is entered here and in ``backward_step``.
    with timed(t, "old_ref_log_probs"), fabric.autocast():
        batch = module.make_batch(rollout, rewards)
    if samples is not None:
        samples.extend(sample_rows(module, rollout, examples, rewards, batch))
    module.train()
    for micro_batches in module.optimizer_steps(batch):
        with timed(t, "forward_backward"):
            for micro in micro_batches:
                module.backward_step(fabric, micro)
        with timed(t, "optimizer"):
            module.on_before_optimizer_step(optimizer)
            if objective is not None:
                objective.on_gradients(module.trainable_parameters(), optimizer.param_groups[0]["lr"])
            if module.max_grad_norm > 0:
                t.update("grad_norm", fabric.clip_gradients(module, optimizer, max_norm=module.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return int(batch.mask.sum())


def run_steps(
    fabric: Fabric,
    module: PolicyGradientModule,
    optimizer: Optimizer,
    backend: RolloutBackend,
    examples: list[dict],
    sampler: ClientSampler,
    local_steps: int,
    on_step: Callable[[int, dict[str, float], list[dict]], None] | None = None,
    objective: LocalObjective | None = None,
    learning_rate: Callable[[int], float] | None = None,
) -> tuple[int, int, dict[str, float]]:
    """Train ``local_steps`` steps on the client's data; returns (prompts, completion tokens, metrics).

    ``learning_rate(step)``: the rate of local step ``step`` (the schedule), set on every parameter group first.
    ``on_step(step, metrics, samples)`` follows each step with its own metrics and scored completions. The metrics
    are the round's means plus each step's own as ``local_step/<i>/<name>`` (``watch.pack_steps``).
    """
    num_prompts = num_tokens = 0
    per_step: list[dict[str, float]] = []
    for step in range(local_steps):
        if learning_rate is not None:
            lr = learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            module.tracker.update("learning_rate", lr)
        batch = [examples[i] for i in sampler.next_batch(module.prompts_per_step)]
        samples: list[dict] = []
        with timed(module.tracker, "step"):
            num_tokens += local_step(fabric, module, optimizer, backend, batch, objective, samples)
        num_prompts += len(batch)
        per_step.append(module.tracker.window())
        if on_step is not None:
            on_step(step, per_step[-1], samples)
    return num_prompts, num_tokens, {**module.tracker.compute_and_reset(), **pack_steps(per_step)}


@torch.no_grad()
def score_examples(
    module: PolicyGradientModule, backend: RolloutBackend, examples: list[dict], batch_size: int = 32
) -> tuple[Tensor, Tensor]:
    """Greedy per-example correctness (``accuracy_func`` >= 1; a failed verifier is wrong) and weighted reward.

    Returns:
        ``(correct, reward)``, each ``(len(examples),)`` float, in the examples' order (paired comparisons of two
        adapters on the same prompts use ``correct``).
    """
    params = module.eval_sampling()
    correct, rewards = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rollout = backend.generate(module, [ex["prompt"] for ex in chunk], params)
        prompts, columns = expand_columns(chunk, 1)
        completions, ids = reward_inputs(prompts, rollout)  # as the training step scores them (TRL's formats)
        kwargs = dict(timeout=module.reward_timeout, completion_ids=ids, trainer_state=module.trainer_state)
        acc, _ = compute_rewards([module.accuracy_func], prompts, completions, columns, **kwargs)
        correct.append((acc[:, 0] >= 1.0).float())
        per_func, _ = compute_rewards(module.reward_funcs, prompts, completions, columns, **kwargs)
        rewards.append(weighted_reward_sum(per_func, module.reward_weights))
    if not correct:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(correct), torch.cat(rewards)


def evaluate(
    module: PolicyGradientModule, backend: RolloutBackend, examples: list[dict], batch_size: int = 32
) -> dict[str, float]:
    """Greedy accuracy and mean weighted reward on held-out examples (``score_examples``); {} for none."""
    if not examples:
        return {}
    correct, rewards = score_examples(module, backend, examples, batch_size)
    return {"accuracy": float(correct.mean()), "reward": float(rewards.nanmean())}


def update_distance(adapter: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> float:
    """L2 distance between two adapters (float64 accumulation)."""
    return sum(float((adapter[k] - v).double().square().sum()) for k, v in start.items()) ** 0.5


class Client:
    """Runs any client's round on the one resident, set-up module and optimizer.

    Args:
        fabric: the launched Fabric the module and optimizer are set up with.
        module: the policy module (``fabric.setup`` done).
        optimizer: its optimizer (``fabric.setup`` done).
        rollout: the generation backend.
        data: the clients' data (``setup`` done).
        aggregation: the federation's aggregator, for its client-side objective; None = local-only training.
        local_steps: local steps per round.
        num_rounds: the run's rounds: with ``local_steps``, the length of the learning-rate schedule.
        seed: seed of the clients' RNG streams and data order.
        client_timeout: seconds a round may take (checked after each local step); None = no limit.
        max_update_norm: largest L2 distance of the update from its starting adapter; None = no limit.
        callbacks: hook objects; this side fires ``on_client_start`` and ``on_local_step_end``.
        hook_context: extra keyword arguments for every hook (e.g. ``trainer`` in one process).
        bank: where client states live; default a RAM bank over ``data.client_ids()``.
    """

    def __init__(
        self,
        fabric: Fabric,
        module: PolicyGradientModule,
        optimizer: Optimizer,
        rollout: RolloutBackend,
        data: FederatedData,
        aggregation: Aggregator | None,
        local_steps: int = 1,
        num_rounds: int = 1,
        seed: int = 0,
        client_timeout: float | None = None,
        max_update_norm: float | None = None,
        callbacks: Sequence[object] = (),
        hook_context: Mapping[str, object] | None = None,
        bank: ClientStateBank | None = None,
    ) -> None:
        self.fabric, self.module, self.optimizer, self.rollout, self.data = fabric, module, optimizer, rollout, data
        self.aggregation, self.local_steps, self.num_rounds, self.seed = aggregation, local_steps, num_rounds, seed
        self.client_timeout, self.max_update_norm = client_timeout, max_update_norm
        self.callbacks, self.hook_context = list(callbacks), dict(hook_context or {})
        self.bank = bank if bank is not None else ClientStateBank(data.client_ids())
        self.initial_adapter = module.trainable_state()
        self.swap_seconds = 0.0  # time spent swapping state in and out, summed over rounds (federated overhead)

    @classmethod
    def setup(
        cls,
        fabric: Fabric,
        module: PolicyGradientModule,
        data: FederatedData,
        rollout: RolloutBackend,
        aggregation: Aggregator | None,
        state_dir: str | Path | None = None,
        keep_versions: int = 2,
        **kwargs: Any,
    ) -> Client:
        """Set up ``module`` and its optimizer on the launched ``fabric`` and every client's split of ``data``, and
        build the client (``kwargs``: the constructor's other arguments). ``state_dir`` puts the bank on disk there
        (one subdirectory per rank when there are several), ``keep_versions`` checkpoints of it restorable."""
        wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
        data.prepare_data()
        data.setup("fit")  # build every client's split now, so bad data fails before any training
        module.setup_data(data)
        bank = open_bank(data.client_ids(), state_dir, keep_versions, fabric.global_rank, fabric.world_size)
        return cls(fabric, wrapped, optimizer, rollout, data, aggregation, bank=bank, **kwargs)

    def _fire(self, hook: str, **kwargs: object) -> None:
        fire(self.callbacks, hook, **{**self.hook_context, "client": self, **kwargs})

    def new_state(self, cid: int) -> ClientState:
        """A client's state before its first round: its own RNG stream and data order, nothing trained."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1_000_003 + cid)
            rng = torch.get_rng_state()
        return ClientState(sampler=self._sampler(cid).state_dict(), rng=rng)

    def _sampler(self, cid: int) -> ClientSampler:
        """Client ``cid``'s data order over its train split, at its start."""
        return ClientSampler(len(self.data.train_examples(cid)), self.seed, cid)

    def state(self, cid: int) -> ClientState:
        """Client ``cid``'s stored state (views of the bank's rows), or its fresh state."""
        stored = self.bank.get(cid)
        return stored if stored is not None else self.new_state(cid)

    def own_adapter(self, cid: int) -> dict[str, Tensor]:
        """The adapter a local-only client trains and deploys: its own, or the initial one before its first round."""
        own = self.bank.read("adapter", cid)
        return own if own is not None else self.initial_adapter

    def run_round(
        self, cid: int, down: Downlink, uplink: Callable[[ClientUpdate], ClientUpdate] | None = None
    ) -> ClientUpdate:
        """Client ``cid``'s round from ``down``: swap in, local steps, checks, ``uplink``, swap out.

        ``uplink`` (the transport's send, which may reject the update) runs before the client's state is stored, so
        a round that fails anywhere leaves the stored state as it was. In local-only training the update's tensors
        are views of the client's stored adapter, valid until its next round. The module's ``begin_round`` gets
        ``down.objective`` once the start state is loaded; its ``end_round`` runs when the local steps end.

        Raises:
            ClientFault: the round timed out or the update is non-finite or too far from where it started.
        """
        module, start = self.module, time.monotonic()
        r, state = down.round_idx, self.state(cid)
        self._fire("on_client_start", round_idx=r, client_id=cid, module=module)
        swap_start = time.perf_counter()
        start_adapter = down.global_state if down.global_state is not None else self.own_adapter(cid)
        module.load_trainable_state(start_adapter)
        load_optimizer(self.optimizer, state.optimizer, state.optimizer_groups)
        module.load_client_state(copy.deepcopy(state.extra.get("module", {})))
        client_extra = copy.deepcopy(state.extra)  # stored only if the round succeeds
        objective = None
        if self.aggregation is not None and down.global_state is not None:
            objective = self.aggregation.local_objective(down.global_state, client_extra, down.objective or None)
        torch.set_rng_state(state.rng)
        sampler = self._sampler(cid)
        sampler.load_state_dict(state.sampler)
        examples = self.data.train_examples(cid)

        def on_step(step: int, metrics: dict[str, float], samples: list[dict]) -> None:
            hook = {"module": module, "step": step, "metrics": metrics, "samples": samples}
            self._fire("on_local_step_end", round_idx=r, client_id=cid, **hook)
            elapsed = time.monotonic() - start
            if self.client_timeout is not None and elapsed > self.client_timeout:
                raise ClientFault(f"timed out after {elapsed:.1f} s (client_timeout={self.client_timeout})")

        train_start = time.perf_counter()
        steps = (self.fabric, module, self.optimizer, self.rollout, examples, sampler, self.local_steps, on_step)
        total = max(self.num_rounds, r) * self.local_steps

        def learning_rate(step: int) -> float:
            return module.learning_rate_at(position(r, self.local_steps, step), total)

        # The rewards' trainer_state: ``score`` advances global_step once per local step from the round's first.
        module.trainer_state = TrainerState(global_step=position(r, self.local_steps, 0), round=r, client_id=cid)
        module.begin_round(down.objective)
        try:
            prompts, tokens, metrics = run_steps(*steps, objective, learning_rate)
        finally:
            module.end_round()
            module.trainer_state = TrainerState(global_step=module.trainer_state.global_step)  # outside a round
        train_end = time.perf_counter()
        extra = objective.finish(module.trainable_parameters(), metrics) if objective is not None else {}
        adapter = module.trainable_state()
        self._check_update(adapter, start_adapter)
        # Scalars a task-aware server may use: the client's task family and its accuracy on this round's rollouts.
        extra.setdefault("task", Counter(ex.get("task", "default") for ex in examples).most_common(1)[0][0])
        if "accuracy" in metrics:
            extra.setdefault("accuracy", metrics["accuracy"])
        update = ClientUpdate(cid, adapter, prompts, tokens, metrics, extra=extra)
        if uplink is not None:
            update = uplink(update)
        client_extra["module"] = module.client_state()
        self._store(cid, sampler, client_extra, adapter if down.global_state is None else None)
        if not down.uploads:
            # Local-only: the update is the stored adapter itself (views of the client's row, no second copy held
            # until the round ends). It is valid until the client's next round rewrites the row: clone to keep it.
            update.state = self.bank.read("adapter", cid)
        self.swap_seconds += (train_start - swap_start) + (time.perf_counter() - train_end)
        return update

    def _check_update(self, adapter: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> None:
        if self.max_update_norm is None:
            return
        norm = update_distance(adapter, start)
        if not math.isfinite(norm):
            raise ClientFault(f"non-finite update (norm {norm})")
        if norm > self.max_update_norm:
            raise ClientFault(f"update norm {norm:.3g} exceeds max_update_norm={self.max_update_norm}")

    def _store(self, cid: int, sampler: ClientSampler, extra: dict, adapter: Mapping[str, Tensor] | None) -> None:
        """Swap out: the optimizer state (and a local-only client's adapter) into its rows, the small values."""
        bank = self.bank
        bank.write("optimizer", cid, optimizer_tensors(self.optimizer))
        if adapter is not None:
            bank.write("adapter", cid, adapter)
        bank.set_meta(cid, sampler.state_dict(), torch.get_rng_state(), extra, optimizer_groups(self.optimizer))

    def evaluate(self, cid: int, adapter: Mapping[str, Tensor], batch_size: int = 32) -> dict[str, float]:
        """Client ``cid``'s greedy held-out accuracy and reward under ``adapter`` ({} if it holds no held-out set)."""
        examples = self.data.eval_examples(cid)
        if not examples:  # nothing to score: not even the adapter to load (a thousand clients without eval splits)
            return {}
        self.module.load_trainable_state(dict(adapter))
        result = evaluate(self.module, self.rollout, examples, batch_size)
        # What the rollout logged while evaluating (e.g. a vLLM weight sync) belongs to this evaluation, not to the
        # next round's first client.
        logged = self.module.tracker.compute_and_reset()
        return {**result, **{k: v for k, v in logged.items() if k.startswith("sync/")}}
