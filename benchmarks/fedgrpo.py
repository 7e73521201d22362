"""FedGRPO on domain-split reasoning-gym tasks: confidence vs random expert selection vs centralized GRPO.

    python benchmarks/fedgrpo.py                                   # embedded model
    python benchmarks/fedgrpo.py --model tiny-random --steps 1 --eval_per_task 2   # smoke run
    # methods in two processes, then one table from both JSON files:
    python benchmarks/fedgrpo.py --methods '[central]' --evaluate_base false --out /tmp/central
    python benchmarks/fedgrpo.py --methods '[]' --merge '[benchmarks/results/fedgrpo.json, /tmp/central/fedgrpo.json]'

The server trains the policy on questions from ``len(tasks)`` domains; ``experts_per_domain x len(tasks)`` expert
clients each hold the labels of one domain (``partition: by_task``) and grade with the task verifier x 8 plus an
answer-tag bonus x 1. Each question is scored by M experts (G = g x M candidates, ``partition`` scoring, pooled
advantage, FedGRPO's bnpo / 0.2-0.3 / beta 1e-4 / 3 iterations). Methods, same steps, questions and loss:

- ``fedgrpo_confidence``: the confidence graph (competence from the auxiliary set, domain from the ``task`` label);
- ``fedgrpo_random``: M experts uniformly at random (the released code's routing);
- ``central``: GRPO with the server holding every label (``reveal_answers``), the same G per question.

Reports held-out greedy accuracy before and after, the share of candidate rewards graded by an expert that holds
the question's labels (the rest earn only the format bonus), bytes per round from the channel's ledger and, for
comparison, the bytes of one FedAvg round on the same LoRA adapter (every expert downloads and uploads it).
Writes ``benchmarks/results/fedgrpo.json`` and ``fedgrpo.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table
from safetensors.torch import save as st_save

from fedrl_lightning.algorithms.fedgrpo import FedGRPOModule
from fedrl_lightning.algorithms.fedgrpo.data import FedGRPOData
from fedrl_lightning.algorithms.fedgrpo.experts import ExpertPool, ExpertSpec
from fedrl_lightning.algorithms.fedgrpo.reward import ExpertReward
from fedrl_lightning.algorithms.fedgrpo.selection import ConfidenceSelector, RandomSelector
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward
from fedrl_lightning.trainer import FederatedTrainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("fedgrpo_confidence", "fedgrpo_random", "central")
TASK_KWARGS = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
}
REWARDS = [reasoning_gym_reward, answer_tag_reward]
WEIGHTS = [8.0, 1.0]


def make_data(cfg: dict[str, Any], reveal_answers: bool) -> FedGRPOData:
    tasks = cfg["tasks"]
    experts = FederatedData(
        tasks=tasks,
        task_kwargs={t: TASK_KWARGS[t] for t in tasks if t in TASK_KWARGS},
        num_clients=cfg["experts_per_domain"] * len(tasks),
        partition="by_task",
        train_size=8,
        eval_size=0,
        seed=cfg["seed"],
    )
    return FedGRPOData(
        experts,
        questions_per_task=cfg["steps"] * cfg["prompts_per_step"],
        eval_per_task=cfg["eval_per_task"],
        aux_per_task=cfg["aux_per_task"],
        task_metadata=True,
        reveal_answers=reveal_answers,
        seed=cfg["seed"],
    )


def run_method(method: str, cfg: dict[str, Any], out_dir: Path, evaluate_base: bool) -> dict[str, Any]:
    """Train one method from the same initial policy; returns accuracy, selection quality and bytes."""
    torch.manual_seed(cfg["seed"])
    common = dict(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=16,
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
        seed=cfg["seed"],
    )
    m, g = cfg["experts_per_question"], cfg["generations_per_expert"]
    reward: ExpertReward | None = None
    if method == "central":
        module: Any = GRPOModule(num_generations=g * m, **common)
        data = make_data(cfg, reveal_answers=True)
    else:
        selector = (
            ConfidenceSelector(seed=cfg["seed"]) if method == "fedgrpo_confidence" else RandomSelector(cfg["seed"])
        )
        pool = ExpertPool(ExpertSpec(reward_funcs=REWARDS, reward_weights=WEIGHTS), seed=cfg["seed"])
        reward = ExpertReward(pool, selector, experts_per_question=m, generations_per_expert=g)
        module = FedGRPOModule(experts=reward, **common)
        data = make_data(cfg, reveal_answers=False)
    run_dir = out_dir / f"fedgrpo_run/{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = FederatedTrainer(
        num_rounds=cfg["steps"],
        local_steps=1,
        aggregation=None,
        eval_every=0,
        eval_before_training=evaluate_base,
        eval_batch_size=cfg["eval_batch_size"],
        output_dir=str(run_dir),
        seed=cfg["seed"],
        progress=False,
    )
    start = time.perf_counter()
    trainer.fit(module, data, ckpt_path=None)
    minutes = (time.perf_counter() - start) / 60
    history = {h["round"]: h for h in trainer.history}
    # The expert wire's ledger, one row per (server step = round, expert, direction); centralized GRPO sends nothing.
    ledger = reward.channel.ledger() if reward is not None else trainer.comm.ledger()
    rounds = range(1, cfg["steps"] + 1)
    result: dict[str, Any] = {
        "accuracy": history[cfg["steps"]]["eval/accuracy_mean"],
        "eval_reward": history[cfg["steps"]]["eval/reward_mean"],
        "train_reward": [history[r].get("client0/reward", math.nan) for r in rounds],
        "minutes": minutes,
        "bytes_down_per_round": _mean_bytes(ledger, rounds, "down"),
        "bytes_up_per_round": _mean_bytes(ledger, rounds, "up"),
        "graph_bytes": {
            d: sum(r["bytes"] for r in ledger if r["round"] == 0 and r["direction"] == d) for d in ("down", "up")
        },
        "tensor_bytes": sum(r["tensor_bytes"] for r in ledger),
        "adapter_bytes": len(st_save({k: v.contiguous() for k, v in module.trainable_state().items()})),
    }
    if evaluate_base:
        result["base_accuracy"] = history[0]["eval/accuracy_mean"]
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
        result["labelled_share"] = hits / total if total else math.nan
        result["competence"] = log["competence"]
    else:
        result["labelled_share"] = 1.0
    return result


def _mean_bytes(ledger: list[dict], rounds: range, direction: str) -> float:
    return sum(r["bytes"] for r in ledger if r["round"] in rounds and r["direction"] == direction) / len(rounds)


def plot(results: dict[str, Any], base: float, path: Path) -> None:
    methods = [m for m in METHODS if m in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(methods, [results[m]["accuracy"] for m in methods], color=["C0", "C1", "C2"][: len(methods)])
    axes[0].axhline(base, color="k", ls="--", lw=1, label="before training")
    axes[0].set_ylabel("held-out accuracy (greedy)")
    axes[0].legend(fontsize=8)
    for m in methods:
        axes[1].plot(range(1, len(results[m]["train_reward"]) + 1), results[m]["train_reward"], marker="o", label=m)
    axes[1].set_xlabel("server step")
    axes[1].set_ylabel("train reward (as the server received it)")
    axes[1].legend(fontsize=8)
    fed = [m for m in methods if m != "central"]
    any_fed = results[fed[0]] if fed else None
    if any_fed is not None:
        names = ["FedGRPO down", "FedGRPO up", "FedAvg-LoRA down", "FedAvg-LoRA up"]
        fedavg = any_fed["fedavg_lora_bytes_per_round"] / 2
        values = [any_fed["bytes_down_per_round"], any_fed["bytes_up_per_round"], fedavg, fedavg]
        axes[2].bar(names, values, color=["C0", "C0", "C3", "C3"])
        axes[2].set_yscale("log")
        axes[2].set_ylabel("bytes per round")
        axes[2].tick_params(axis="x", labelsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    methods: list[str] = list(METHODS),
    model: str = "embedded",
    tasks: list[str] = ["basic_arithmetic", "gcd"],
    experts_per_domain: int = 2,
    experts_per_question: int = 2,
    generations_per_expert: int = 4,
    steps: int = 8,
    prompts_per_step: int = 2,
    num_iterations: int = 3,
    max_completion_length: int = 48,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    eval_per_task: int = 32,
    aux_per_task: int = 8,
    eval_batch_size: int = 16,
    seed: int = 0,
    out: str = "benchmarks/results",
    evaluate_base: bool = True,
    merge: list[str] = [],
) -> dict[str, Any]:
    """Run ``methods`` with one budget and write the table, JSON and PNG.

    ``evaluate_base`` scores the untrained policy before the first method. ``merge`` names ``fedgrpo.json`` files of
    other processes run with the same configuration (methods run in parallel); their results join this run's.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    cfg = {k: v for k, v in locals().items() if k not in ("methods", "out", "unknown", "evaluate_base", "merge")}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    base = math.nan
    for path in merge:
        other = json.loads(Path(path).read_text())
        if other["config"] != cfg:
            raise ValueError(f"{path} was run with another configuration: {other['config']}")
        results.update(other["results"])
        base = other["base_accuracy"] if math.isnan(base) else base
    for i, method in enumerate(methods):
        Console().rule(f"fedgrpo: {method}")
        results[method] = run_method(method, cfg, out_dir, evaluate_base=evaluate_base and i == 0)
        base = results[method].get("base_accuracy", base)
        num_experts = experts_per_domain * len(tasks)
        # A FedAvg round on the same adapter: every expert downloads the global adapter and uploads its own.
        results[method]["fedavg_lora_bytes_per_round"] = 2 * num_experts * results[method]["adapter_bytes"]
        (out_dir / "fedgrpo.json").write_text(
            json.dumps({"config": cfg, "base_accuracy": base, "results": results}, indent=2)
        )
    (out_dir / "fedgrpo.json").write_text(
        json.dumps({"config": cfg, "base_accuracy": base, "results": results}, indent=2)
    )
    n_eval = eval_per_task * len(tasks)
    group = generations_per_expert * experts_per_question
    table = Table(title=f"FedGRPO, {steps} server steps x {prompts_per_step} questions x G={group}")
    table.caption = (
        f"domains {tasks}, {experts_per_domain} experts per domain, M={experts_per_question}; held-out: {n_eval} "
        f"questions, greedy; accuracy before training {base:.3f}. 'labelled' = share of candidate rewards graded by "
        "an expert holding the question's labels. FedAvg-LoRA: one round, every expert downloads + uploads the adapter."
    )
    for col in (
        "method",
        "accuracy",
        "eval reward",
        "labelled",
        "down B/round",
        "up B/round",
        "tensor B",
        "FedAvg-LoRA B/round",
        "minutes",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in [m for m in METHODS if m in results]:
        r = results[m]
        table.add_row(
            m,
            f"{r['accuracy']:.3f}",
            f"{r['eval_reward']:.2f}",
            f"{r['labelled_share']:.2f}",
            f"{r['bytes_down_per_round']:.0f}",
            f"{r['bytes_up_per_round']:.0f}",
            str(r["tensor_bytes"]),
            f"{r['fedavg_lora_bytes_per_round']:.3g}",
            f"{r['minutes']:.1f}",
        )
    Console(width=160).print(table)
    plot(results, base, out_dir / "fedgrpo.png")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
