"""What a person reads of a run: the plan before it starts, one line per round, the summary table at the end."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.modules.policy import PolicyModule
    from fedrl_lightning.trainer import FederatedTrainer

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def run_loggers(output_dir: str | Path) -> list[Logger]:
    """A run's loggers: ``metrics.csv`` and TensorBoard logs under ``output_dir``."""
    return [MetricsCSV(output_dir), TensorBoardLogger(str(output_dir), name="tensorboard", version="")]


class MetricsCSV(Logger):
    """``metrics.csv``, one row per round (``step``), appended to and never deleted.

    Lightning's CSV logger deletes an existing file when it starts, so a resumed run would rely on replaying every
    earlier row. Here a resume calls ``resume(history)``: rows of the checkpointed rounds stay as they are; rows of
    rounds after the checkpoint (their checkpoint never landed, they run again) are dropped; rows missing from the
    file are restored from the history. A file that already matches is not touched.
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(output_dir) / "metrics.csv"
        self._pending: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "metrics.csv"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters live in ``config.yaml`` beside the file."""

    @rank_zero_only  # every rank logs the same rounds; one writes
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._pending.append({**{k: float(v) for k, v in metrics.items()}, "step": step})

    @rank_zero_only  # every rank logs the same rounds; one writes
    def save(self) -> None:
        if not self._pending:
            return
        header, rows = self._read()
        keys = sorted(set(header) | {k for row in self._pending for k in row})
        if keys != header:  # a new column: rewrite the file with the wider header (rows keep their values)
            self._write(keys, rows + self._pending)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(self._pending)
        self._pending = []

    @rank_zero_only  # every rank logs the same rounds; one writes
    def resume(self, history: list[Mapping[str, Any]]) -> None:
        """Make the file hold exactly the checkpointed rounds' rows, keeping the rows already written for them."""
        header, rows = self._read()
        done = {int(h["round"]): h for h in history}
        kept = [row for row in rows if row.get("step") not in (None, "") and int(float(row["step"])) in done]
        have = {int(float(row["step"])) for row in kept}
        missing = [
            {**{k: v for k, v in h.items() if k != "round"}, "step": r} for r, h in done.items() if r not in have
        ]
        if len(kept) == len(rows) and not missing:
            return
        keys = sorted(set(header) | {k for row in missing for k in row})
        self._write(keys, sorted(kept + missing, key=lambda row: int(float(row["step"]))))

    def _read(self) -> tuple[list[str], list[dict[str, Any]]]:
        if not self.path.is_file():
            return [], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write(self, keys: list[str], rows: list[Mapping[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


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
