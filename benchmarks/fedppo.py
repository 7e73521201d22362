"""Federated PPO on per-client task families: isolated PPO, the peer mixtures and FedAvg of LoRA, same budget each.

    python benchmarks/fedppo.py                                  # every method, embedded model
    python benchmarks/fedppo.py --methods '[isolated, uniform]' --rounds 2

Four clients, one reasoning-gym task family each (``configs/fedppo.yaml``'s). Every method trains ``rounds x
local_steps`` PPO steps per client with the same seed; only the KL reference and the communication differ:

* ``isolated``: ``PeerMixture`` with self-preference 1.0 (the reference is the client's own snapshot, refreshed at
  each sync; nothing is sent down);
* ``uniform``: own weight ``self_preference``, the peers share the rest (their snapshots are sent down each round);
* ``score``: softmax of the peers' last scores;
* ``fedavg``: FedAvg of the LoRA adapters and value head, the reference is the synced global model.

Every method's module has a ``PeerReference``.

Held-out reward and accuracy (greedy) per client at round 0 and at the end; bytes per round down and up per client.
Writes ``benchmarks/results/fedppo.json`` and ``fedppo.png`` and prints the table.
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

from fedrl_lightning.aggregation import Aggregator, FedAvg
from fedrl_lightning.algorithms.fedppo import PeerMixture, PeerReference
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward
from fedrl_lightning.trainer import FederatedTrainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("isolated", "uniform", "score", "fedavg")
TASKS = ["basic_arithmetic", "chain_sum", "gcd", "simple_equations"]
TASK_KWARGS = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
}


def _aggregation(method: str, cfg: dict[str, Any]) -> Aggregator:
    if method == "fedavg":
        return FedAvg()
    if method == "isolated":
        return PeerMixture(self_preference=1.0)
    if method == "score":
        return PeerMixture(weighting="score", score_temperature=cfg["score_temperature"])
    return PeerMixture(self_preference=cfg["self_preference"])


def run_method(method: str, cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train one method on a fresh model; returns held-out metrics per evaluated round and bytes per round."""
    torch.manual_seed(cfg["seed"])
    rounds = cfg["rounds"]
    data = FederatedData(
        tasks=TASKS,
        task_kwargs=TASK_KWARGS,
        num_clients=len(TASKS),
        partition="by_task",
        train_size=cfg["rounds"] * cfg["local_steps"] * cfg["prompts_per_step"],  # the same data for every method
        eval_size=cfg["eval_size"],
        seed=cfg["seed"],
    )
    module = PPOModule(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        num_generations=cfg["num_generations"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=16,
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        kl_coef=cfg["kl_coef"],
        peer_reference=PeerReference(),
        num_iterations=cfg["ppo_epochs"],
        num_mini_batches=cfg["num_mini_batches"],
        reward_funcs=[reasoning_gym_reward, answer_tag_reward],
        reward_weights=[1.0, 0.2],
        accuracy_func=reasoning_gym_reward,
        seed=cfg["seed"],
    )
    run_dir = out_dir / f"fedppo_run/{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = FederatedTrainer(
        num_rounds=rounds,
        local_steps=cfg["local_steps"],
        aggregation=_aggregation(method, cfg),
        eval_every=0,
        eval_before_training=True,
        eval_batch_size=cfg["eval_batch_size"],
        output_dir=str(run_dir),
        seed=cfg["seed"],
    )
    start = time.perf_counter()
    trainer.fit(module, data, ckpt_path=None)
    evals = []
    for h in trainer.history:
        if math.isfinite(h.get("eval/reward_mean", math.nan)):
            evals.append(
                {
                    "round": h["round"],
                    "reward": [h[f"client{c}/eval/reward"] for c in range(len(TASKS))],
                    "accuracy": [h[f"client{c}/eval/accuracy"] for c in range(len(TASKS))],
                }
            )
    per_round = [trainer.comm.totals(r) for r in range(1, rounds + 1)]
    n = len(TASKS)
    return {
        "eval": evals,
        "bytes_per_client_round": {d: sum(t[d] for t in per_round) / (rounds * n) for d in ("down", "up")},
        "train_reward_last": trainer.history[-1].get("train/reward_mean", math.nan),
        "minutes": (time.perf_counter() - start) / 60,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    methods = [m for m in METHODS if m in results and results[m]["eval"]]
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        final = results[m]["eval"][-1]["reward"]
        ax_r.bar([c + i * width for c in range(len(TASKS))], final, width, label=m)
    first = results[methods[0]]["eval"][0]["reward"] if methods else []
    ax_r.scatter(
        [c + 0.4 - width / 2 for c in range(len(first))], first, color="black", marker="_", s=300, label="round 0"
    )
    ax_r.set_xticks([c + 0.4 - width / 2 for c in range(len(TASKS))], TASKS, fontsize=8)
    ax_r.set_ylabel("held-out reward (greedy), final round")
    ax_r.legend(fontsize=8)
    all_methods = [m for m in METHODS if m in results]
    down = [results[m]["bytes_per_client_round"]["down"] / 1e6 for m in all_methods]
    up = [results[m]["bytes_per_client_round"]["up"] / 1e6 for m in all_methods]
    xs = range(len(all_methods))
    ax_b.bar([x - 0.2 for x in xs], down, 0.4, label="down")
    ax_b.bar([x + 0.2 for x in xs], up, 0.4, label="up")
    ax_b.set_xticks(list(xs), all_methods, fontsize=8)
    ax_b.set_yscale("symlog")
    ax_b.set_ylabel("MB per client per round")
    ax_b.legend(fontsize=8)
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    methods: list[str] = list(METHODS),
    model: str = "embedded",
    rounds: int = 3,
    local_steps: int = 2,
    prompts_per_step: int = 2,
    num_generations: int = 4,
    max_completion_length: int = 48,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    kl_coef: float = 0.1,
    ppo_epochs: int = 2,
    num_mini_batches: int = 2,
    self_preference: float = 0.5,
    score_temperature: float = 1.0,
    eval_size: int = 16,
    eval_batch_size: int = 16,
    seed: int = 0,
    out: str = "benchmarks/results",
) -> dict[str, Any]:
    """Run ``methods`` with one budget and write the table, JSON and PNG."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    cfg = {k: v for k, v in locals().items() if k not in ("methods", "out", "unknown")}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "fedppo.json"
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results = saved.get("results", {}) if saved.get("config") == cfg else {}
    for method in methods:
        Console().rule(f"fedppo: {method}")
        results[method] = run_method(method, cfg, out_dir)
        json_path.write_text(json.dumps({"config": cfg, "results": results}, indent=2))
    table = Table(
        title=f"Federated PPO, {rounds} rounds x {local_steps} PPO steps per client: held-out reward (greedy)"
    )
    table.add_column("method")
    for cid in range(len(TASKS)):
        table.add_column(f"c{cid}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("accuracy mean", justify="right")
    table.add_column("MB down / up per client-round", justify="right")
    table.add_column("minutes", justify="right")
    table.caption = ", ".join(f"c{c}: {t}" for c, t in enumerate(TASKS)) + "; cells: round 0 -> final"
    for m in [m for m in METHODS if m in results]:
        r = results[m]
        b = r["bytes_per_client_round"]
        traffic = f"{b['down'] / 1e6:.2f} / {b['up'] / 1e6:.2f}"
        if not r["eval"]:
            table.add_row(m, *["-"] * len(TASKS), "-", "-", traffic, f"{r['minutes']:.0f}")
            continue
        first, last = r["eval"][0], r["eval"][-1]
        cells = [f"{a:.3f} -> {b_:.3f}" for a, b_ in zip(first["reward"], last["reward"])]
        mean = f"{sum(first['reward']) / len(TASKS):.3f} -> {sum(last['reward']) / len(TASKS):.3f}"
        acc = f"{sum(first['accuracy']) / len(TASKS):.3f} -> {sum(last['accuracy']) / len(TASKS):.3f}"
        table.add_row(m, *cells, mean, acc, traffic, f"{r['minutes']:.0f}")
    Console(width=200).print(table)
    plot(results, out_dir / "fedppo.png")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
