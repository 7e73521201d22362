"""Federated algorithms on heterogeneous clients, same budget each: held-out accuracy per client and round.

    python benchmarks/heterogeneous.py                                   # every method, embedded model
    python benchmarks/heterogeneous.py --methods '[fedavg, fgrpo]' --rounds 2

Four clients, each with one reasoning-gym task family (``configs/quickstart.yaml``'s), and heterogeneous rewards:
client 0 scores the same verifier on a scale 10x the others' (``ScaledReward`` with ``client_columns``). Every
method trains ``rounds x local_steps`` GRPO steps per client (the centralized run: the same number of steps on the
union of the four clients' data) and is evaluated greedily on every client's held-out set at round 0, every
``eval_every`` rounds and at the end. Methods: local-only, FedAvg, FedProx, FedAdam, FGRPO (relative-gain
weights), FedMOA (hypergradient objective weights + task-aware aggregation), centralized GRPO.

Writes ``benchmarks/results/heterogeneous.json`` and ``heterogeneous.png`` and prints the table. Methods run one
after the other in one process; ``--methods`` picks a subset and results of earlier runs are kept in the JSON.
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

from fedrl_lightning.aggregation import FedAdam, FedAvg, FedProx, RelativeGainWeighting, TaskAwareFedAvg
from fedrl_lightning.client import evaluate
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import FedMOAModule, GRPOModule
from fedrl_lightning.modules.fedmoa import simplex_weights
from fedrl_lightning.rewards import ScaledReward, answer_tag_reward, reasoning_gym_reward
from fedrl_lightning.trainer import FederatedTrainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METHODS = ("local_only", "fedavg", "fedprox", "fedadam", "fgrpo", "fedmoa", "central")
TASKS = ["basic_arithmetic", "chain_sum", "gcd", "simple_equations"]
TASK_KWARGS = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
}


class UnionData:
    """One client holding the union of a federated data set's train examples (centralized GRPO on the same data).

    It has no held-out set of its own: ``PerClientEval`` scores the central model on every original client's.
    """

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


class PerClientEval:
    """At each evaluation of the central run, score its model on every federated client's held-out set."""

    def __init__(self, data: FederatedData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def on_evaluate_end(self, trainer: FederatedTrainer, metrics: dict[str, float]) -> None:
        trainer.module.load_trainable_state(trainer.global_state)
        accs = []
        for cid in self.data.client_ids():
            result = evaluate(trainer.module, trainer.rollout, self.data.eval_examples(cid), self.batch_size)
            metrics[f"client{cid}/eval/accuracy"] = result["accuracy"]
            metrics[f"client{cid}/eval/reward"] = result["reward"]
            accs.append(result["accuracy"])
        metrics["eval/accuracy_mean"] = sum(accs) / len(accs)


def run_method(method: str, cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train one method on a fresh model and data; returns per-round evaluation rows."""
    torch.manual_seed(cfg["seed"])
    fed = FederatedData(
        tasks=TASKS,
        task_kwargs=TASK_KWARGS,
        num_clients=len(TASKS),
        partition="by_task",
        train_size=cfg["rounds"] * cfg["local_steps"] * cfg["prompts_per_step"],
        eval_size=cfg["eval_size"],
        seed=cfg["seed"],
        client_columns={0: {"reward_scale": cfg["reward_scale"]}},
    )
    module_cls = FedMOAModule if method == "fedmoa" else GRPOModule
    module = module_cls(
        model=cfg["model"],
        lora_r=16,
        lora_alpha=32,
        learning_rate=cfg["learning_rate"],
        num_generations=cfg["num_generations"],
        prompts_per_step=cfg["prompts_per_step"],
        micro_batch_size=16,
        max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"],
        reward_funcs=[ScaledReward(reasoning_gym_reward), answer_tag_reward],
        reward_weights=[1.0, 0.2],
        accuracy_func=reasoning_gym_reward,
        seed=cfg["seed"],
    )
    aggregation: Any = FedAvg()
    callbacks: list[Any] = []
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
    elif method == "central":
        data, local_steps = UnionData(fed), cfg["local_steps"] * len(TASKS)
        callbacks = [PerClientEval(fed, cfg["eval_batch_size"])]
    run_dir = out_dir / f"heterogeneous_run/{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = FederatedTrainer(
        num_rounds=cfg["rounds"],
        local_steps=local_steps,
        aggregation=aggregation,
        callbacks=callbacks,
        eval_every=cfg["eval_every"],
        eval_batch_size=cfg["eval_batch_size"],
        output_dir=str(run_dir),
        seed=cfg["seed"],
    )
    start = time.perf_counter()
    trainer.fit(module, data, ckpt_path=None)
    rows = []
    for h in trainer.history:
        if "eval/accuracy_mean" not in h or not math.isfinite(h["eval/accuracy_mean"]):
            continue
        per_client = [h.get(f"client{cid}/eval/accuracy", math.nan) for cid in range(len(TASKS))]
        rows.append({"round": h["round"], "clients": per_client, "mean": h["eval/accuracy_mean"]})
    extra = {}
    if method == "fedmoa":  # the primary objective's final weight per client (client-private)
        extra["primary_weight"] = [
            float(simplex_weights(trainer.client_states[c].extra["module"]["fedmoa_logits"], module.weight_floor)[0])
            for c in range(len(TASKS))
        ]
    return {"eval": rows, "minutes": (time.perf_counter() - start) / 60, **extra}


def plot(results: dict[str, Any], path: Path) -> None:
    methods = [m for m in METHODS if m in results]
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(4 * (len(TASKS) + 1), 3.6), sharey=True)
    for m in methods:
        rows = results[m]["eval"]
        rounds = [r["round"] for r in rows]
        for cid, task in enumerate(TASKS):
            axes[cid].plot(rounds, [r["clients"][cid] for r in rows], marker="o", label=m)
            axes[cid].set_title(f"client {cid}: {task}" + (" (reward x10)" if cid == 0 else ""), fontsize=9)
        axes[-1].plot(rounds, [r["mean"] for r in rows], marker="o", label=m)
    axes[-1].set_title("mean over clients", fontsize=9)
    axes[0].set_ylabel("held-out accuracy (greedy)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    methods: list[str] = list(METHODS),
    model: str = "embedded",
    rounds: int = 2,
    local_steps: int = 2,
    prompts_per_step: int = 2,
    num_generations: int = 8,
    max_completion_length: int = 48,
    temperature: float = 0.7,
    learning_rate: float = 1e-4,
    reward_scale: float = 10.0,
    fedprox_mu: float = 0.01,
    fedadam_eta: float = 1e-3,
    eval_size: int = 16,
    eval_batch_size: int = 16,
    eval_every: int = 1,
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
    json_path = out_dir / "heterogeneous.json"
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results = saved.get("results", {}) if saved.get("config") == cfg else {}
    for method in methods:
        Console().rule(f"heterogeneous: {method}")
        results[method] = run_method(method, cfg, out_dir)
        json_path.write_text(json.dumps({"config": cfg, "results": results}, indent=2))
    table = Table(title=f"held-out accuracy, {rounds} rounds x {local_steps} steps per client, client 0 reward x10")
    table.add_column("method")
    table.add_column("round", justify="right")
    table.caption = ", ".join(f"c{cid}: {task}" for cid, task in enumerate(TASKS)) + "; minutes per method"
    for cid in range(len(TASKS)):
        table.add_column(f"c{cid}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("minutes", justify="right")
    for m in [m for m in METHODS if m in results]:
        for row in results[m]["eval"]:
            cells = [f"{a:.3f}" for a in row["clients"]]
            table.add_row(m, str(row["round"]), *cells, f"{row['mean']:.3f}", f"{results[m]['minutes']:.0f}")
    Console().print(table)
    plot(results, out_dir / "heterogeneous.png")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
