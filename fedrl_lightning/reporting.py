"""What a person reads of a run: the plan before it starts, the progress display, one line per round, completion
tables, the summary table at the end; and the loggers that write the metrics (``metrics.csv``, TensorBoard, W&B,
MLflow)."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.modules.policy import PolicyModule
    from fedrl_lightning.trainer import FederatedTrainer

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from fedrl_lightning.stats import wilson_interval


def _requires(package: str) -> None:
    """An optional extra's package, or one line saying how to install it."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"trainer.loggers: {package} is not installed: pip install 'fedrl-lightning[{package}]'")


def _wandb(output_dir: Path) -> Logger:
    _requires("wandb")
    from lightning.pytorch.loggers import WandbLogger

    project = os.environ.get("WANDB_PROJECT", "fedrl-lightning")
    return WandbLogger(name=output_dir.name, save_dir=str(output_dir), project=project)


def _mlflow(output_dir: Path) -> Logger:
    _requires("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    # $MLFLOW_TRACKING_URI wins; else a file store under the output directory.
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedrl-lightning")
    return MLFlowLogger(experiment_name=experiment, run_name=output_dir.name, save_dir=str(output_dir / "mlruns"))


LOGGERS: dict[str, Callable[[Path], Logger]] = {
    "csv": lambda out: MetricsCSV(out),
    "tensorboard": lambda out: TensorBoardLogger(str(out), name="tensorboard", version=""),
    "wandb": _wandb,
    "mlflow": _mlflow,
}
"""The loggers ``trainer.loggers`` names; ``wandb`` and ``mlflow`` are optional extras."""


def run_loggers(output_dir: str | Path, names: Sequence[str] = ("csv", "tensorboard")) -> list[Logger]:
    """A run's loggers by name (``LOGGERS``): ``metrics.csv`` and TensorBoard logs under ``output_dir`` by default.

    Raises:
        ValueError: an unknown name, or an optional logger whose package is missing (one line each).
    """
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ValueError(f"trainer.loggers: unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
    return [LOGGERS[name](Path(output_dir)) for name in dict.fromkeys(names)]


def _round_of(row: Mapping[str, Any]) -> int | None:
    """The round a ``metrics.csv`` row belongs to (a round row written before the ``round`` column: its ``step``);
    None for a row without either."""
    for key in ("round", "step"):
        if row.get(key) not in (None, ""):
            return int(float(row[key]))
    return None


class MetricsCSV(Logger):
    """``metrics.csv``: one row per round and, with ``trainer.log_every_n_steps``, one per client local step;
    appended to and never deleted.

    A round's row has ``round`` and empty ``client`` and ``step`` (files written before local-step rows existed
    have no ``round`` column and the round in ``step``). A local step's row (``log_rows``, written just before its
    round's row) has ``round``, ``client``, ``step`` (the run's local step, ``(round - 1) * local_steps + i + 1``)
    and the step's own metrics under the names of the round's per-client ones (``reward``, ``loss``, ``kl``,
    ``learning_rate``...): round rows are those with an empty ``client``.

    Lightning's CSV logger deletes an existing file when it starts, so a resumed run would rely on replaying every
    earlier row. Here a resume calls ``resume(history)``: rows of the checkpointed rounds stay as they are; rows of
    rounds after the checkpoint (their checkpoint never landed, they run again) are dropped, step rows included;
    round rows missing from the file are restored from the history (step rows are not in checkpoints: missing ones
    stay missing). A file that already matches is not touched.
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
        self._pending.append(
            {**{k: float(v) for k, v in metrics.items()}, "round": step}
        )  # Lightning's step: the round

    @rank_zero_only  # every rank logs the same rounds; one writes
    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Local-step rows (``round``, ``client``, ``step`` and the step's metrics), written at the next ``save``."""
        self._pending.extend(dict(row) for row in rows)

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
        kept = [row for row in rows if _round_of(row) in done]
        have = {_round_of(row) for row in kept if not row.get("client")}
        missing = [dict(h) for r, h in done.items() if r not in have]
        if len(kept) == len(rows) and not missing:
            return
        keys = sorted(set(header) | {k for row in missing for k in row})
        # stable: a round's step rows stay before its row
        self._write(keys, sorted(kept + missing, key=_round_of))

    def step_rewards(self) -> list[tuple[int, int, float]]:
        """(client, step, reward) of the file's local-step rows, for the plot."""
        rows = self._read()[1]
        steps = [r for r in rows if r.get("client") and r.get("reward")]
        return [(int(float(r["client"])), int(float(r["step"])), float(r["reward"])) for r in steps]

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


class EtaColumn(ProgressColumn):
    """Time left at the pace since the task started, counting work after its ``done_before`` field (a resumed run's
    earlier rounds); rich's own estimate needs progress within its last 30 s, which a long round does not give."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("done_before", 0)
        if not task.total or done <= 0 or not task.elapsed or task.finished:
            return Text("")
        left = task.elapsed / done * (task.total - task.completed)
        return Text(f"eta {timedelta(seconds=round(left))}", style="progress.remaining")


class InfoColumn(ProgressColumn):
    """A task's ``info`` field (e.g. the last local step's reward)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")), style="cyan")


def progress_bar(console: Console | None) -> Progress:
    """A rich progress display on ``console`` (rounds, the round's clients, the client's local steps: each with its
    elapsed time and ETA); a disabled one without a console."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        EtaColumn(),
        InfoColumn(),
        console=console,
        disable=console is None,
    )


def _short(text: Any, width: int) -> str:
    """One line of at most ``width`` characters; a conversational prompt shows its last message."""
    if isinstance(text, list) and text and isinstance(text[-1], Mapping):
        text = text[-1].get("content", "")
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def completions_table(rows: Sequence[Mapping[str, Any]], max_rows: int = 8) -> Table:
    """A compact table of one step's completions (``callbacks.watch.CompletionsLog`` rows), as TRL's."""
    first = rows[0]
    title = f"completions: round {first['round']}, client {first['client']}, step {first['step']}"
    names = list(first.get("rewards", {}))
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("prompt", "completion"):  # cut to a line on a wide console; a narrow one wraps them, not the numbers
        table.add_column(col)
    for col in ("reward", *(n.removesuffix("_reward") for n in names), "advantage"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))  # numbers are never squeezed

    def num(value: float | None) -> str:
        return "nan" if value is None else f"{value:.3f}"

    for row in rows[:max_rows]:
        per_func = [num(row["rewards"].get(n)) for n in names]
        cells = (_short(row["prompt"], 40), _short(row["completion"], 60), num(row["reward"]))
        table.add_row(*cells, *per_func, num(row.get("advantage")))
    if len(rows) > max_rows:
        table.caption = f"{max_rows} of {len(rows)} completions (all in completions.jsonl)"
    return table


MAX_CLIENT_ROWS = 32  # a thousand-client federation prints a table, not a thousand lines


def print_plan(console: Console, trainer: FederatedTrainer, module: PolicyModule, data: FederatedData) -> None:
    """The federation and the batch geometry, printed once so a mis-sized run is obvious before it starts."""
    table = Table(title="clients")
    for col in ("client", "train", "held-out", "tasks"):
        table.add_column(col, justify="right" if col != "tasks" else "left")
    rows = data.describe()
    for row in rows[:MAX_CLIENT_ROWS]:
        tasks = ", ".join(f"{k}:{v}" for k, v in row["task_counts"].items())
        table.add_row(str(row["client_id"]), str(row["n_train"]), str(row["n_eval"]), tasks)
    if len(rows) > MAX_CLIENT_ROWS:
        n_train, n_eval = sum(r["n_train"] for r in rows), sum(r["n_eval"] for r in rows)
        table.caption = f"{MAX_CLIENT_ROWS} of {len(rows)} clients shown; {n_train} train, {n_eval} held-out in all"
    console.print(table)
    g = getattr(module, "num_generations", 1)
    per_step = getattr(module, "prompts_per_step", 0)
    agg = type(trainer.aggregation).__name__ if trainer.aggregation is not None else "none (local-only)"
    console.print(
        f"{trainer.num_rounds} rounds x {trainer.local_steps} local steps; {per_step} prompts x {g} generations "
        f"= {per_step * g} completions per step; aggregation {agg}; outputs in {trainer.output_dir}"
    )
    if "tensorboard" in getattr(trainer, "logger_names", ()):
        console.print(f"watch the curves live: tensorboard --logdir {trainer.output_dir}")


def print_round(console: Console, r: int, num_rounds: int, metrics: dict[str, float]) -> None:
    line = f"round {r}/{num_rounds}: train reward {metrics.get('train/reward_mean', float('nan')):.3f}"
    if math.isfinite(metrics.get("eval/accuracy_mean", math.nan)):  # NaN: no client holds a held-out set
        line += f", held-out accuracy {metrics['eval/accuracy_mean']:.3f}"
    line += f", sent {metrics['comm/bytes_down'] / 1e6:.2f} MB down / {metrics['comm/bytes_up'] / 1e6:.2f} MB up"
    if metrics.get("faults/dropped"):
        line += f", {int(metrics['faults/dropped'])} client(s) dropped"
    console.print(line)


def _with_interval(accuracy: float, n: int | None) -> str:
    """``0.250 [0.16, 0.37]``: an accuracy over ``n`` prompts with its 95% Wilson interval (none without ``n``)."""
    if n is None or not math.isfinite(accuracy):
        return f"{accuracy:.3f}"
    low, high = wilson_interval(accuracy * n, n)
    return f"{accuracy:.3f} [{low:.2f}, {high:.2f}]"


def print_summary(
    console: Console,
    history: list[dict[str, float]],
    client_ids: list[int],
    eval_sizes: Mapping[int, int] | None = None,
) -> None:
    """Held-out accuracy and reward per client, first evaluation vs last.

    With ``eval_sizes`` (each client's count of held-out prompts) every accuracy carries its 95% Wilson interval, and
    the mean row's interval pools all clients' held-out prompts (the mean itself is the clients' unweighted mean, as
    ``eval/accuracy_mean``; the two agree when every client holds as many prompts).
    """
    evals = [h for h in history if math.isfinite(h.get("eval/accuracy_mean", math.nan))]  # NaN: no client scored
    if not evals:
        return
    first, last = evals[0], evals[-1]
    sizes = dict(eval_sizes or {})
    title = f"held-out accuracy (round {first['round']} -> {last['round']})"
    if sizes:
        title += ", 95% Wilson intervals"
    table = Table(title=title)
    prompts_col = ("prompts",) if sizes else ()
    for col in ("client", *prompts_col, "before", "after", "reward before", "reward after"):
        table.add_column(col, justify="right", no_wrap=True)
    correct, total, shown = [0, 0], 0, 0  # pooled over the clients with a known size: before, after; prompts
    for cid in client_ids:
        k = f"client{cid}/eval"
        n = sizes.get(cid)
        accs = [h.get(f"{k}/accuracy", float("nan")) for h in (first, last)]
        if n is not None and all(math.isfinite(a) for a in accs):
            correct = [c + round(a * n) for c, a in zip(correct, accs, strict=True)]
            total += n
        if not any(math.isfinite(a) for a in accs):  # never evaluated (no held-out set): no row
            continue
        shown += 1
        if shown > MAX_CLIENT_ROWS:  # in the pooled mean only
            continue
        rewards = (f"{h.get(f'{k}/reward', float('nan')):.3f}" for h in (first, last))
        count = (str(n) if n is not None else "",) if sizes else ()
        table.add_row(str(cid), *count, *(_with_interval(a, n) for a in accs), *rewards)
    means = []
    for h, c in zip((first, last), correct, strict=True):
        cell = f"{h['eval/accuracy_mean']:.3f}"
        if total:
            low, high = wilson_interval(c, total)
            cell += f" [{low:.2f}, {high:.2f}]"
        means.append(cell)
    rewards = (f"{h['eval/reward_mean']:.3f}" for h in (first, last))
    table.add_row("mean", *((str(total),) if sizes else ()), *means, *rewards)
    if shown > MAX_CLIENT_ROWS:
        table.caption = f"{MAX_CLIENT_ROWS} of {shown} evaluated clients shown; the mean is over all"
    console.print(table)
