"""A PNG of a run: training reward and held-out accuracy per client per round, and the reward per local step."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _series(history: list[dict[str, float]], pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    """{label: (rounds, values)} for every metric key matching ``pattern`` (one group = the client id)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for key, value in row.items():
            m = re.fullmatch(pattern, key)
            if m and value == value:  # skip NaN
                rounds, values = out.setdefault(f"client {m.group(1)}", ([], []))
                rounds.append(int(row["round"]))
                values.append(float(value))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split()[-1])))


def plot_steps(ax: plt.Axes, steps: Sequence[tuple[int, int, float]]) -> None:
    """Training reward per logged local step (``(client, step, reward)``): one line per client plus the mean."""
    by_client: dict[int, list[tuple[int, float]]] = defaultdict(list)
    by_step: dict[int, list[float]] = defaultdict(list)
    for client, step, reward in steps:
        if reward == reward:  # skip NaN
            by_client[client].append((step, reward))
            by_step[step].append(reward)
    for client, points in sorted(by_client.items()):
        ax.plot(*zip(*sorted(points)), marker=".", alpha=0.6, label=f"client {client}")
    if by_step:
        ax.plot(*zip(*((s, sum(v) / len(v)) for s, v in sorted(by_step.items()))), color="black", label="mean")
    ax.set_title("training reward per local step")
    ax.set_xlabel("local step of the run")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_run(history: list[dict[str, float]], path: str | Path, steps: Sequence[tuple[int, int, float]] = ()) -> Path:
    """Two panels (train reward, held-out accuracy), one line per client plus the mean, and with ``steps`` (logged
    local steps' ``(client, step, reward)``) a third: the reward per local step; returns ``path``."""
    fig, axes = plt.subplots(1, 3 if steps else 2, figsize=(16.5 if steps else 11, 4))
    panels = (
        (axes[0], r"client(\d+)/reward", "train/reward_mean", "training reward"),
        (axes[1], r"client(\d+)/eval/accuracy", "eval/accuracy_mean", "held-out accuracy (greedy)"),
    )
    for ax, pattern, mean_key, title in panels:
        for label, (rounds, values) in _series(history, pattern).items():
            ax.plot(rounds, values, marker="o", alpha=0.7, label=label)
        mean = [(int(h["round"]), h[mean_key]) for h in history if mean_key in h and h[mean_key] == h[mean_key]]
        if mean:
            ax.plot(*zip(*mean), color="black", linewidth=2.5, label="mean")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing drawn (no held-out set): no empty legend
            ax.legend(fontsize="small")
    if steps:
        plot_steps(axes[2], steps)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
