"""Does the policy learn? The embedded model on one easy task for a fixed budget, held-out numbers before and after.

    python benchmarks/learning.py                      # basic_arithmetic, 20 GRPO steps of 4 prompts x 8
    python benchmarks/learning.py --rounds 2 --local_steps 2    # a quicker look

Centralized GRPO (one client) through the same FederatedTrainer as every federated run. Prints mean training
reward and held-out greedy accuracy/reward before and after; writes JSON and the curves PNG under
``benchmarks/results/``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from fedrl_lightning.aggregation import FedAvg
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward
from fedrl_lightning.trainer import FederatedTrainer


def main(
    task: str = "basic_arithmetic",
    rounds: int = 4,
    local_steps: int = 5,
    prompts_per_step: int = 4,
    num_generations: int = 8,
    max_completion_length: int = 48,
    learning_rate: float = 1e-4,
    temperature: float = 0.7,
    eval_size: int = 48,
    eval_every: int = 2,
    seed: int = 0,
    out: str = "benchmarks/results",
) -> dict:
    """Train ``rounds * local_steps`` GRPO steps and compare held-out metrics before and after."""
    out_dir = Path(out)
    run_dir = out_dir / "learning_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    module = GRPOModule(
        model="embedded",
        lora_r=16,
        lora_alpha=32,
        learning_rate=learning_rate,
        num_generations=num_generations,
        prompts_per_step=prompts_per_step,
        micro_batch_size=16,
        max_completion_length=max_completion_length,
        temperature=temperature,
        reward_funcs=[reasoning_gym_reward, answer_tag_reward],
        reward_weights=[1.0, 0.2],
        accuracy_func=reasoning_gym_reward,
        seed=seed,
    )
    data = FederatedData(
        tasks=[task],
        num_clients=1,
        train_size=rounds * local_steps * prompts_per_step,
        eval_size=eval_size,
        seed=seed,
        task_kwargs={"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
    )
    trainer = FederatedTrainer(
        num_rounds=rounds,
        local_steps=local_steps,
        aggregation=FedAvg(),
        eval_every=eval_every,
        output_dir=str(run_dir),
        seed=seed,
    )
    start = time.perf_counter()
    trainer.fit(module, data, ckpt_path=None)
    minutes = (time.perf_counter() - start) / 60
    evals = [h for h in trainer.history if "eval/accuracy_mean" in h]
    train = [h["client0/reward"] for h in trainer.history if "client0/reward" in h]
    k = max(1, len(train) // 3)
    result = {
        "task": task,
        "steps": rounds * local_steps,
        "completions_per_step": prompts_per_step * num_generations,
        "minutes": minutes,
        "train_reward_first_third": sum(train[:k]) / k,
        "train_reward_last_third": sum(train[-k:]) / k,
        "eval": [
            {"round": h["round"], "accuracy": h["eval/accuracy_mean"], "reward": h["eval/reward_mean"]} for h in evals
        ],
        "threads": torch.get_num_threads(),
    }
    table = Table(title=f"learning: {task}, {result['steps']} GRPO steps, {minutes:.1f} min")
    for col in ("", "before", "after"):
        table.add_column(col, justify="right")
    table.add_row(
        "held-out accuracy (greedy)", f"{evals[0]['eval/accuracy_mean']:.3f}", f"{evals[-1]['eval/accuracy_mean']:.3f}"
    )
    table.add_row("held-out reward", f"{evals[0]['eval/reward_mean']:.3f}", f"{evals[-1]['eval/reward_mean']:.3f}")
    table.add_row(
        "train reward (first / last third)",
        f"{result['train_reward_first_third']:.3f}",
        f"{result['train_reward_last_third']:.3f}",
    )
    Console().print(table)
    (out_dir / "learning.json").write_text(json.dumps(result, indent=2))
    shutil.copy(run_dir / "curves.png", out_dir / "learning.png")
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
