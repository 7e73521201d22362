"""What a person reads of a run: the plan before it starts, one line per round, the summary table at the end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.modules.policy import PolicyModule
    from fedrl_lightning.trainer import FederatedTrainer

from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def run_loggers(output_dir: str | Path) -> list[Logger]:
    """A run's loggers: ``metrics.csv`` and TensorBoard logs under ``output_dir``."""
    return [
        CSVLogger(str(output_dir), name="", version=""),
        TensorBoardLogger(str(output_dir), name="tensorboard", version=""),
    ]


def progress_bar(console: Console | None) -> Progress:
    """A rich progress display on ``console``; a disabled one without a console."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )


def print_plan(console: Console, trainer: FederatedTrainer, module: PolicyModule, data: FederatedData) -> None:
    """The federation and the batch geometry, printed once so a mis-sized run is obvious before it starts."""
    table = Table(title="clients")
    for col in ("client", "train", "held-out", "tasks"):
        table.add_column(col, justify="right" if col != "tasks" else "left")
    for row in data.describe():
        tasks = ", ".join(f"{k}:{v}" for k, v in row["task_counts"].items())
        table.add_row(str(row["client_id"]), str(row["n_train"]), str(row["n_eval"]), tasks)
    console.print(table)
    g = getattr(module, "num_generations", 1)
    per_step = getattr(module, "prompts_per_step", 0)
    agg = type(trainer.aggregation).__name__ if trainer.aggregation is not None else "none (local-only)"
    console.print(
        f"{trainer.num_rounds} rounds x {trainer.local_steps} local steps; {per_step} prompts x {g} generations "
        f"= {per_step * g} completions per step; aggregation {agg}; outputs in {trainer.output_dir}"
    )


def print_round(console: Console, r: int, num_rounds: int, metrics: dict[str, float]) -> None:
    line = f"round {r}/{num_rounds}: train reward {metrics.get('train/reward_mean', float('nan')):.3f}"
    if "eval/accuracy_mean" in metrics:
        line += f", held-out accuracy {metrics['eval/accuracy_mean']:.3f}"
    line += f", sent {metrics['comm/bytes_down'] / 1e6:.2f} MB down / {metrics['comm/bytes_up'] / 1e6:.2f} MB up"
    if metrics.get("faults/dropped"):
        line += f", {int(metrics['faults/dropped'])} client(s) dropped"
    console.print(line)


def print_summary(console: Console, history: list[dict[str, float]], client_ids: list[int]) -> None:
    """Held-out accuracy and reward per client, first evaluation vs last."""
    evals = [h for h in history if "eval/accuracy_mean" in h]
    if not evals:
        return
    first, last = evals[0], evals[-1]
    table = Table(title=f"held-out accuracy (round {first['round']} -> {last['round']})")
    for col in ("client", "before", "after", "reward before", "reward after"):
        table.add_column(col, justify="right")
    for cid in client_ids:
        k = f"client{cid}/eval"
        cells = (f"{h.get(f'{k}/{m}', float('nan')):.3f}" for m in ("accuracy", "reward") for h in (first, last))
        table.add_row(str(cid), *cells)
    table.add_row("mean", *(f"{h[f'eval/{m}_mean']:.3f}" for m in ("accuracy", "reward") for h in (first, last)))
    console.print(table)
