"""Federated PPO on per-client task families: isolated PPO, the peer mixtures and FedAvg of LoRA, several seeds.

    python benchmarks/fedppo.py                                         # every method, seeds 0 1 2
    python benchmarks/fedppo.py --methods '[isolated, uniform]' --seeds '[0]'   # a piece of it

Four clients, one reasoning-gym task family each (``configs/fedppo.yaml``'s). Every method trains ``rounds x
local_steps`` PPO steps per client with the same seed; only the KL reference and the communication differ:

* ``isolated``: ``PeerMixture`` with self-preference 1.0 (the reference is the client's own snapshot, refreshed at
  each sync; nothing is sent down);
* ``uniform``: own weight ``self_preference``, the peers share the rest (their snapshots are sent down each round);
* ``score``: softmax of the peers' last scores;
* ``fedavg``: FedAvg of the LoRA adapters and value head, the reference is the synced global model.

Every method's module has a ``PeerReference``. The peer mixtures are personalized: each client deploys its own
adapter, which scores its own held-out prompts (and, each of them, the untrained families); FedAvg's global adapter
scores every client's. Each method is compared with isolated PPO and with FedAvg on identical prompts (exact
McNemar, pooled over clients and seeds; ``paired.py``), beside greedy held-out accuracy per seed and bytes per round.

Results accumulate in ``<out>/fedppo.json`` by budget, method and seed (a finished pair is skipped unless
``--force true``); the tables and ``fedppo.png`` are rebuilt from all of them each time.
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

from fedrl_lightning.aggregation import Aggregator, FedAvg
from fedrl_lightning.algorithms.fedppo import PeerMixture, PeerReference
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward

METHODS = ("isolated", "uniform", "score", "fedavg")


def _aggregation(method: str, cfg: dict[str, Any]) -> Aggregator:
    if method == "fedavg":
        return FedAvg()
    if method == "isolated":
        return PeerMixture(self_preference=1.0)
    if method == "score":
        return PeerMixture(weighting="score", score_temperature=cfg["score_temperature"])
    return PeerMixture(self_preference=cfg["self_preference"])


def make_module(cfg: dict[str, Any], seed: int) -> PPOModule:
    return PPOModule(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        num_generations=cfg["num_generations"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=cfg["micro_batch_size"],
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        kl_coef=cfg["kl_coef"],
        peer_reference=PeerReference(),
        num_iterations=cfg["ppo_epochs"],
        num_mini_batches=cfg["num_mini_batches"],
        reward_funcs=[reasoning_gym_reward, answer_tag_reward],
        reward_weights=[1.0, 0.2],
        accuracy_func=reasoning_gym_reward,
        seed=seed,
    )


def train(method: str, cfg: dict[str, Any], seed: int, run_dir: Path) -> Trained:
    """Train one method from a fresh model on the seed's data; bytes per client and round beside the adapters."""
    torch.manual_seed(seed)
    rounds = cfg["rounds"]
    data = client_data(cfg, seed, 0)
    module = make_module(cfg, seed)
    trainer, trained = fit(module, data, _aggregation(method, cfg), rounds, cfg["local_steps"], run_dir, seed, GROUPS)
    per_round = [trainer.comm.totals(r) for r in range(1, rounds + 1)]
    n = len(TASKS)
    for direction in ("down", "up"):
        trained.extra[f"MB_{direction}_per_client_round"] = sum(t[direction] for t in per_round) / (rounds * n) / 1e6
    trained.extra["train_reward_last_round"] = trainer.history[-1].get("train/reward_mean", float("nan"))
    return trained


def main(
    methods: list[str] = list(METHODS),
    seeds: list[int] = [0, 1, 2],
    model: str = "embedded",
    rounds: int = 3,
    local_steps: int = 4,
    prompts_per_step: int = 4,
    num_generations: int = 4,
    max_completion_length: int = 32,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    micro_batch_size: int = 16,
    kl_coef: float = 0.1,
    ppo_epochs: int = 2,
    num_mini_batches: int = 2,
    self_preference: float = 0.5,
    score_temperature: float = 1.0,
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
        eval_size: held-out prompts per client (greedy).
        untrained_families: reasoning-gym families no client trains on, ``untrained_size`` prompts each.
        out: where ``fedppo.json``, ``fedppo.png`` and the runs go.
        force: rerun (method, seed) pairs already stored for this budget.
    """
    cfg = {k: v for k, v in locals().items() if k not in ("methods", "seeds", "out", "force")}
    check_untrained(untrained_families, TASKS)
    bench = Benchmark(
        name="fedppo",
        methods=METHODS,
        references=("isolated", "fedavg"),
        held_out=client_held_out,
        train=train,
        base_module=make_module,
        title=(
            f"Federated PPO: {rounds} rounds x {local_steps} PPO steps x {prompts_per_step} prompts x "
            f"{num_generations} per client, {eval_size} held-out prompts per client"
        ),
    )
    return run(bench, cfg, methods, seeds, out, force)


if __name__ == "__main__":
    CLI(main, as_positional=False)
