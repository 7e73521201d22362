"""FedGRPO on domain-split reasoning-gym tasks: confidence vs random expert selection vs centralized GRPO, seeds.

    python benchmarks/fedgrpo.py                                         # every method, seeds 0 1 2
    python benchmarks/fedgrpo.py --methods '[central]' --seeds '[0]'      # a piece (another process may share --out)
    python benchmarks/fedgrpo.py --model tiny-random --steps 1 --eval_per_task 2 --untrained_size 2 --out /tmp/fg

The server trains the policy on questions from ``len(tasks)`` domains; ``experts_per_domain x len(tasks)`` expert
clients each hold the labels of one domain (``partition: by_task``) and grade with the task verifier x 8 plus an
answer-tag bonus x 1. Each question is scored by M experts (G = g x M candidates, ``partition`` scoring, pooled
advantage, FedGRPO's bnpo / 0.2-0.3 / beta 1e-4 / 3 iterations). Methods, same steps, questions and loss:

- ``fedgrpo_confidence``: the confidence graph (competence from the auxiliary set, domain from the ``task`` label);
- ``fedgrpo_random``: M experts uniformly at random (the released code's routing);
- ``central``: GRPO with the server holding every label (``reveal_answers``), the same G per question.

After training the server's adapter scores ``eval_per_task`` held-out questions per domain (greedy; the groups of
the paired tests are the domains) and the untrained families (``paired.py``); the base model is scored once per
seed. Each method is compared with random routing and with centralized GRPO on identical prompts (exact McNemar,
pooled over domains and seeds). Also reported: the share of candidate rewards graded by an expert that holds the
question's labels (the rest earn only the format bonus), bytes per round from the channel's ledger and, for
comparison, the bytes of one FedAvg round on the same LoRA adapter (every expert downloads and uploads it).

Results accumulate in ``<out>/fedgrpo.json`` by budget, method and seed (a finished pair is skipped unless
``--force true``); the tables and ``fedgrpo.png`` are rebuilt from all of them each time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from paired import TASK_KWARGS, UNTRAINED_FAMILIES, Benchmark, Trained, check_untrained, fit, run
from safetensors.torch import save as st_save

from fedrl_lightning.algorithms.fedgrpo import FedGRPOModule
from fedrl_lightning.algorithms.fedgrpo.data import FedGRPOData
from fedrl_lightning.algorithms.fedgrpo.experts import ExpertPool, ExpertSpec
from fedrl_lightning.algorithms.fedgrpo.reward import ExpertReward
from fedrl_lightning.algorithms.fedgrpo.selection import ConfidenceSelector, RandomSelector
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward

METHODS = ("fedgrpo_confidence", "fedgrpo_random", "central")
REWARDS = [reasoning_gym_reward, answer_tag_reward]
WEIGHTS = [8.0, 1.0]


def make_data(cfg: dict[str, Any], seed: int, reveal_answers: bool, eval_per_task: int) -> FedGRPOData:
    """The seed's questions and expert labels. Training gets ``eval_per_task`` 0 (the trainer scores nothing): the
    server's train questions do not depend on it, and the held-out questions come from the same call with it."""
    tasks = cfg["tasks"]
    experts = FederatedData(
        tasks=tasks,
        task_kwargs={t: TASK_KWARGS[t] for t in tasks if t in TASK_KWARGS},
        num_clients=cfg["experts_per_domain"] * len(tasks),
        partition="by_task",
        train_size=8,
        eval_size=0,
        seed=seed,
    )
    return FedGRPOData(
        experts,
        questions_per_task=cfg["steps"] * cfg["prompts_per_step"],
        eval_per_task=eval_per_task,
        aux_per_task=cfg["aux_per_task"],
        task_metadata=True,
        reveal_answers=reveal_answers,
        seed=seed,
    )


def held_out(cfg: dict[str, Any], seed: int) -> dict[str, list[dict]]:
    """The server's held-out questions, grouped by domain."""
    examples = make_data(cfg, seed, reveal_answers=False, eval_per_task=cfg["eval_per_task"]).eval_examples(0)
    return {task: [ex for ex in examples if ex["task"] == task] for task in cfg["tasks"]}


def _common(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    return dict(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=cfg["micro_batch_size"],
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        reward_funcs=REWARDS,
        reward_weights=WEIGHTS,
        accuracy_func=reasoning_gym_reward,
        loss_type="bnpo",
        scale_rewards="none",
        epsilon=0.2,
        epsilon_high=0.3,
        beta=1e-4,
        num_iterations=cfg["num_iterations"],
        seed=seed,
    )


def make_module(cfg: dict[str, Any], seed: int) -> GRPOModule:
    """Centralized GRPO's module (also the base: every method starts from the same policy)."""
    return GRPOModule(num_generations=cfg["generations_per_expert"] * cfg["experts_per_question"], **_common(cfg, seed))


def train(method: str, cfg: dict[str, Any], seed: int, run_dir: Path) -> Trained:
    """Train one method from the same initial policy; the server's adapter, selection quality and bytes."""
    torch.manual_seed(seed)
    m, g = cfg["experts_per_question"], cfg["generations_per_expert"]
    reward: ExpertReward | None = None
    if method == "central":
        module: Any = make_module(cfg, seed)
        data = make_data(cfg, seed, reveal_answers=True, eval_per_task=0)
    else:
        selector = ConfidenceSelector(seed=seed) if method == "fedgrpo_confidence" else RandomSelector(seed)
        pool = ExpertPool(ExpertSpec(reward_funcs=REWARDS, reward_weights=WEIGHTS), seed=seed)
        reward = ExpertReward(pool, selector, experts_per_question=m, generations_per_expert=g)
        module = FedGRPOModule(experts=reward, **_common(cfg, seed))
        data = make_data(cfg, seed, reveal_answers=False, eval_per_task=0)
    steps = cfg["steps"]
    trainer, trained = fit(module, data, None, steps, 1, run_dir, seed, cfg["tasks"], progress=False)
    history = {h["round"]: h for h in trainer.history}
    # The expert wire's ledger, one row per (server step = round, expert, direction); centralized GRPO sends nothing.
    ledger = reward.channel.ledger() if reward is not None else trainer.comm.ledger()
    rounds = range(1, steps + 1)
    adapter_bytes = len(st_save({k: v.contiguous() for k, v in module.trainable_state().items()}))
    num_experts = cfg["experts_per_domain"] * len(cfg["tasks"])
    trained.extra = {
        "bytes_down_per_round": _mean_bytes(ledger, rounds, "down"),
        "bytes_up_per_round": _mean_bytes(ledger, rounds, "up"),
        "tensor_bytes": sum(r["tensor_bytes"] for r in ledger),
        # a FedAvg round on the same adapter: every expert downloads the global adapter and uploads its own
        "fedavg_lora_bytes_per_round": 2 * num_experts * adapter_bytes,
        "labelled_share": 1.0,
    }
    trained.details = {
        "train_reward": [history[r].get("client0/reward", math.nan) for r in rounds],
        "graph_bytes": {
            d: sum(r["bytes"] for r in ledger if r["round"] == 0 and r["direction"] == d) for d in ("down", "up")
        },
    }
    if reward is not None:
        log = reward.record()
        owners = {k: data.expert_domains(k) for k in data.expert_ids()}
        hits = total = 0
        for entry in log["steps"]:
            for key, n in entry["selections"].items():
                if "->" in key:
                    task, expert = key.split("->")
                    total += n
                    hits += n * (task in owners[int(expert.removeprefix("expert"))])
        trained.extra["labelled_share"] = hits / total if total else math.nan
        trained.details["competence"] = log["competence"]
    return trained


def _mean_bytes(ledger: list[dict], rounds: range, direction: str) -> float:
    return sum(r["bytes"] for r in ledger if r["round"] in rounds and r["direction"] == direction) / len(rounds)


def main(
    methods: list[str] = list(METHODS),
    seeds: list[int] = [0, 1, 2],
    model: str = "embedded",
    tasks: list[str] = ["basic_arithmetic", "gcd"],
    experts_per_domain: int = 2,
    experts_per_question: int = 2,
    generations_per_expert: int = 4,
    steps: int = 16,
    prompts_per_step: int = 4,
    num_iterations: int = 3,
    max_completion_length: int = 32,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    micro_batch_size: int = 32,
    eval_per_task: int = 128,
    aux_per_task: int = 8,
    eval_batch_size: int = 64,
    untrained_families: list[str] = UNTRAINED_FAMILIES,
    untrained_size: int = 64,
    out: str = "benchmarks/results",
    force: bool = False,
) -> dict[str, Any]:
    """Run the missing (method, seed) pairs of ``methods`` x ``seeds`` with one budget; print and plot them all.

    Args:
        methods: any of ``METHODS``, and ``base`` (with ``force``: score the base model again).
        seeds: each seed draws the questions, expert data and held-out questions and seeds the training; all
            methods of a seed share them (paired comparisons).
        model: the policy (``embedded``: SmolLM2-135M-Instruct; ``tiny-random`` for a smoke run).
        eval_per_task: held-out server questions per domain (greedy).
        untrained_families: reasoning-gym families outside ``tasks``, ``untrained_size`` prompts each.
        out: where ``fedgrpo.json``, ``fedgrpo.png`` and the runs go.
        force: rerun (method, seed) pairs already stored for this budget.
    """
    cfg = {k: v for k, v in locals().items() if k not in ("methods", "seeds", "out", "force")}
    check_untrained(untrained_families, tasks)
    group = generations_per_expert * experts_per_question
    bench = Benchmark(
        name="fedgrpo",
        methods=METHODS,
        references=("fedgrpo_random", "central"),
        held_out=held_out,
        train=train,
        base_module=make_module,
        title=(
            f"FedGRPO: {steps} server steps x {prompts_per_step} questions x G={group} (M={experts_per_question}), "
            f"domains {', '.join(tasks)}, {eval_per_task} held-out questions per domain"
        ),
    )
    return run(bench, cfg, methods, seeds, out, force)


if __name__ == "__main__":
    CLI(main, as_positional=False)
