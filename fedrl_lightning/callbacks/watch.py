"""Watching a run live: the local steps on the progress display, and completion samples as TRL's ``log_completions``.

The trainer adds these itself (``trainer.progress``, ``trainer.log_completions_every``). Both act where rank 0's
clients train, in one process with the server (the progress display is the server's, ``Server.bar``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fedrl_lightning import ranks
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.reporting import completions_table
from fedrl_lightning.watch import run_step

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from fedrl_lightning.client import Client
    from fedrl_lightning.server import Server


class StepProgress(Callback):
    """A ``client <i> steps`` bar under the server's rounds and clients bars, with the last step's reward; each step
    also advances the rounds bar by its share of the round, so the run's ETA moves within long rounds."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.clients = 1  # this rank's clients in the round
        self.finished = 0  # of them, those whose steps are done

    def on_round_start(self, server: Server) -> None:
        self.bar = server.bar

    def on_clients_selected(self, server: Server, client_ids: list[int]) -> None:
        mine = ranks.shard(client_ids, server.fabric.global_rank, server.fabric.world_size)
        self.clients, self.finished = max(1, len(mine)), 0

    def on_client_start(self, client: Client, client_id: int) -> None:
        if self.bar is None:
            return
        description = f"client {client_id} steps"
        if self.task is None:
            self.task = self.bar.add_task(description, total=client.local_steps)
        else:
            self.bar.reset(self.task, total=client.local_steps, description=description, info="")

    def on_local_step_end(self, client: Client, round_idx: int, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None or self.task is None:
            return
        info = f"reward {metrics['reward']:.3f}" if "reward" in metrics else ""
        self.bar.update(self.task, completed=step + 1, info=info)
        share = (self.finished + (step + 1) / client.local_steps) / self.clients
        self.bar.update(self.bar.task_ids[0], completed=round_idx - 1 + min(share, 1.0))
        if step + 1 == client.local_steps:
            self.finished += 1

    def on_round_end(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
        self.task = None


class CompletionsLog(Callback):
    """Every ``every`` local steps of the run, the step's scored completions appended to
    ``<output_dir>/completions.jsonl`` and shown as a compact table on ``console`` (as TRL's ``log_completions``).

    One JSON object per completion: ``round``, ``client``, ``step`` (the run's local step, as in ``metrics.csv``),
    ``prompt`` (as the data gives it: a string or messages), ``completion``, ``reward`` (weighted), ``rewards`` (per
    function) and ``advantage``; NaN is written as null. Like ``metrics.csv`` the file is only appended to, and a
    round that runs again (a resumed run's rounds after its checkpoint, a retried round) first drops its earlier
    rows. With several ranks, the samples of rank 0's clients.

    Args:
        output_dir: the run's output directory.
        every: log the steps whose run index is a multiple of this.
        console: where the tables go; None = the file only.
        max_rows: completions per table (the file has all).
    """

    def __init__(self, output_dir: str | Path, every: int, console: Console | None = None, max_rows: int = 8) -> None:
        if every < 1:
            raise ValueError(f"log_completions_every must be >= 1 here, got {every}")
        self.path = Path(output_dir) / "completions.jsonl"
        self.every, self.console, self.max_rows = every, console, max_rows
        self.started = 0  # the last round started in this process; 0 = none yet

    def on_round_start(self, server: Server, round_idx: int) -> None:
        # The first round of a fit (a resume's rows after the checkpoint) or a retried one: drop its earlier rows.
        if server.fabric.is_global_zero and (not self.started or round_idx <= self.started):
            self.trim(round_idx)
        self.started = round_idx

    def on_local_step_end(
        self, client: Client, round_idx: int, client_id: int, step: int, samples: Sequence[dict[str, Any]]
    ) -> None:
        index = run_step(round_idx, client.local_steps, step)
        if not samples or index % self.every or not client.fabric.is_global_zero:
            return
        rows = [{"round": round_idx, "client": client_id, "step": index, **sample} for sample in samples]
        with open(self.path, "a") as f:  # one write per step: a crash tears at most the last line
            f.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
        if self.console is not None:
            self.console.print(completions_table(rows, self.max_rows))

    def trim(self, round_idx: int) -> None:
        """Keep the rows of rounds before ``round_idx`` (a torn last line goes too); untouched when nothing goes."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _round(line) is not None and _round(line) < round_idx]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def _round(line: str) -> int | None:
    """A completions row's round; None for a torn line."""
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None


__all__ = ["CompletionsLog", "StepProgress"]
