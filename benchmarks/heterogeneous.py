"""Federated algorithms on heterogeneous clients, same budget each, several seeds: paired held-out accuracy.

    python benchmarks/heterogeneous.py                                        # every method, seeds 0 1 2
    python benchmarks/heterogeneous.py --methods '[fedavg, central]' --seeds '[0]'   # a piece of it
    python benchmarks/heterogeneous.py --methods '[]' --seeds '[0]'           # only score the base model

Four clients, each with one reasoning-gym task family (``configs/quickstart.yaml``'s), and heterogeneous rewards:
client 0 scores the same verifier on a scale ``reward_scale`` times the others' (``ScaledReward`` with
``client_columns``; the knob FGRPO's relative-gain weights are meant to handle). Every method trains ``rounds x
local_steps`` GRPO steps per client; the centralized run trains ``rounds x local_steps x 4`` steps on the union of
the four clients' data (the federation's compute). Methods: local-only, FedAvg, FedProx, FedAdam, FGRPO
(relative-gain weights), FedMOA (hypergradient objective weights + task-aware aggregation), centralized GRPO.

The default budget is the quickstart's tasks and batch over twice its rounds at a third of its learning rate (6
rounds, lr 1e-4: centralized GRPO gains +0.191 over the base on seed 0; NOTES, "A budget where centralized GRPO
gains >= +0.15"; the quickstart's own budget is ``--rounds 3 --learning_rate 3e-4``), with 128 held-out prompts per
client. After training, the final adapter(s) score every client's held-out prompts and the untrained families
(``paired.py``); the base model is scored once per seed. The table compares each method with FedAvg and with the
base on identical prompts (exact McNemar, pooled over clients and seeds).

Results accumulate in ``<out>/heterogeneous.json`` by budget, method and seed (a finished pair is skipped unless
``--force true``); the tables and ``heterogeneous.png`` are rebuilt from all of them each time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from paired import (
    GROUPS,
    TASKS,
    UNTRAINED_FAMILIES,
    Benchmark,
    Trained,
    check_untrained,
    client_data,
    client_held_out,
    fit,
    run,
)

from fedrl_lightning.aggregation import FedAdam, FedAvg, FedProx, RelativeGainWeighting, TaskAwareFedAvg
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import FedMOAModule, GRPOModule
from fedrl_lightning.modules.fedmoa import simplex_weights
from fedrl_lightning.rewards import ScaledReward, answer_tag_reward, reasoning_gym_reward

METHODS = ("local_only", "fedavg", "fedprox", "fedadam", "fgrpo", "fedmoa", "central")


class UnionData:
    """One client holding the union of a federated data set's train examples (centralized GRPO on the same data)."""

    def __init__(self, data: FederatedData) -> None:
        self.data = data

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def client_ids(self) -> list[int]:
        return [0]

    def train_examples(self, client_id: int) -> list[dict]:
        return self.data.union_train_examples()

    def eval_examples(self, client_id: int) -> list[dict]:
        return []

    def describe(self) -> list[dict[str, Any]]:
        rows = self.data.describe()
        counts: dict[str, int] = {}
        for row in rows:
            for task, n in row["task_counts"].items():
                counts[task] = counts.get(task, 0) + n
        return [{"client_id": 0, "n_train": sum(r["n_train"] for r in rows), "n_eval": 0, "task_counts": counts}]


def columns(cfg: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {0: {"reward_scale": cfg["reward_scale"]}}


def held_out(cfg: dict[str, Any], seed: int) -> dict[str, list[dict]]:
    return client_held_out(cfg, seed, columns(cfg))


def make_module(cfg: dict[str, Any], seed: int, module_cls: type[GRPOModule] = GRPOModule) -> GRPOModule:
    return module_cls(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        num_generations=cfg["num_generations"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=cfg["micro_batch_size"],
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        loss_type="dapo",
        scale_rewards="group",
        beta=0.0,
        reward_funcs=[ScaledReward(reasoning_gym_reward), answer_tag_reward],
        reward_weights=[1.0, 0.2],
        accuracy_func=reasoning_gym_reward,
        seed=seed,
    )


def train(method: str, cfg: dict[str, Any], seed: int, run_dir: Path) -> Trained:
    """Train one method from a fresh model on the seed's data."""
    torch.manual_seed(seed)
    fed = client_data(cfg, seed, 0, columns(cfg))
    module = make_module(cfg, seed, FedMOAModule if method == "fedmoa" else GRPOModule)
    aggregation: Any = FedAvg()
    data: Any = fed
    local_steps = cfg["local_steps"]
    if method == "local_only":
        aggregation = None
    elif method == "fedprox":
        aggregation = FedProx(mu=cfg["fedprox_mu"])
    elif method == "fedadam":
        aggregation = FedAdam(eta=cfg["fedadam_eta"], tau=1e-3)
    elif method == "fgrpo":
        aggregation = RelativeGainWeighting(aggregator=FedAvg())
    elif method == "fedmoa":
        aggregation = TaskAwareFedAvg()
    elif method == "central":  # one client on the union, as many steps as the four clients together
        data, local_steps = UnionData(fed), cfg["local_steps"] * len(TASKS)
    trainer, trained = fit(module, data, aggregation, cfg["rounds"], local_steps, run_dir, seed, GROUPS)
    if method == "fedmoa":  # the primary objective's final weight per client (client-private)
        trained.details["primary_weight"] = [
            float(simplex_weights(trainer.client_states[c].extra["module"]["fedmoa_logits"], module.weight_floor)[0])
            for c in range(len(TASKS))
        ]
    return trained


def main(
    methods: list[str] = list(METHODS),
    seeds: list[int] = [0, 1, 2],
    model: str = "embedded",
    rounds: int = 6,
    local_steps: int = 4,
    prompts_per_step: int = 4,
    num_generations: int = 8,
    max_completion_length: int = 32,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    micro_batch_size: int = 32,
    reward_scale: float = 10.0,
    fedprox_mu: float = 0.01,
    fedadam_eta: float = 1e-3,
    eval_size: int = 128,
    eval_batch_size: int = 64,
    untrained_families: list[str] = UNTRAINED_FAMILIES,
    untrained_size: int = 64,
    out: str = "benchmarks/results",
    force: bool = False,
) -> dict[str, Any]:
    """Run the missing (method, seed) pairs of ``methods`` x ``seeds`` with one budget; print and plot them all.

    Args:
        methods: any of ``METHODS``, and ``base`` (with ``force``: score the base model again).
        seeds: each seed draws the clients' data and held-out prompts and seeds the training; all methods of a seed
            share them (paired comparisons).
        model: the policy (``embedded``: SmolLM2-135M-Instruct; ``tiny-random`` for a smoke run).
        reward_scale: client 0's reward multiplier (the heterogeneity FGRPO's weights address).
        eval_size: held-out prompts per client (greedy).
        untrained_families: reasoning-gym families no client trains on, ``untrained_size`` prompts each.
        out: where ``heterogeneous.json``, ``heterogeneous.png`` and the runs go.
        force: rerun (method, seed) pairs already stored for this budget.
    """
    cfg = {k: v for k, v in locals().items() if k not in ("methods", "seeds", "out", "force")}
    check_untrained(untrained_families, TASKS)
    bench = Benchmark(
        name="heterogeneous",
        methods=METHODS,
        references=("fedavg",),
        held_out=held_out,
        train=train,
        base_module=make_module,
        title=(
            f"heterogeneous: {rounds} rounds x {local_steps} steps x {prompts_per_step} prompts x {num_generations} "
            f"per client, client 0 reward x{reward_scale:g}, {eval_size} held-out prompts per client"
        ),
    )
    return run(bench, cfg, methods, seeds, out, force)


if __name__ == "__main__":
    CLI(main, as_positional=False)
