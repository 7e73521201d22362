"""Peak memory as the number of clients grows: one resident base model, per-client state on CPU.

    python benchmarks/memory.py                          # 1, 4, 16, 64 clients on the embedded model
    python benchmarks/memory.py --clients '[1, 8]'

Each count runs in its own process: one tiny local-only round (every client keeps its own adapter and optimizer
state, the most a client can hold), 1 prompt x 2 completions x 4 tokens, a checkpoint at the end. The prediction is

    peak(N) = peak(1) + (N - 1) x (adapter + optimizer state)

with the adapter and AdamW's two moments measured from the run's client states (tensor bytes). Reports the peak
resident set size (``ru_maxrss``) per count, the growth over the 1-client run, growth / predicted growth, and the
least-squares slope of peak RSS on the client count (what each further client costs) against the per-client state.
Writes ``benchmarks/results/memory.json`` and ``memory.png``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MB = 2**20


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def child(num_clients: int, model: str, rounds: int = 1) -> dict[str, Any]:
    """``rounds`` local-only rounds of ``num_clients`` tiny clients; returns peak RSS and the per-client state."""
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.modules import GRPOModule
    from fedrl_lightning.trainer import FederatedTrainer

    module = GRPOModule(
        model=model,
        lora_r=16,
        lora_alpha=32,
        num_generations=2,
        prompts_per_step=1,
        micro_batch_size=2,
        max_completion_length=4,
    )
    data = FederatedData(
        tasks=["basic_arithmetic"],
        num_clients=num_clients,
        partition="iid",
        train_size=2,  # per client: each client's data, and the work per client, stay the same as N grows
        eval_size=1,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = FederatedTrainer(
            num_rounds=rounds,
            aggregation=None,
            eval_every=0,
            eval_before_training=False,
            keep_checkpoints=1,
            output_dir=out,
            progress=False,
        )
        trainer.fit(module, data, ckpt_path=None)
        states = list(trainer.client_states.values())
        adapter = sum(_tensor_bytes(s.adapter) for s in states) / num_clients
        optimizer = sum(_tensor_bytes(s.optimizer) for s in states) / num_clients
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"clients": num_clients, "peak_rss": peak, "adapter_bytes": adapter, "optimizer_bytes": optimizer}


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs: the memory each further client costs, constant overheads aside."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(
    clients: list[int] = [1, 4, 16, 64],  # noqa: B006
    model: str = "embedded",
    out: str = "benchmarks/results",
    rounds: int = 1,
    child_clients: int = 0,
) -> list[dict[str, Any]] | None:
    """Run each client count in a fresh process and compare the peak RSS growth with the prediction."""
    if child_clients:  # internal: this process is one measurement
        print(json.dumps(child(child_clients, model, rounds)))
        return None
    rows = []
    for n in clients:
        Console().print(f"memory: {n} clients")
        proc = subprocess.run(
            [sys.executable, __file__, "--child_clients", str(n), "--model", model, "--rounds", str(rounds)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{n} clients failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = rows[0]
    per_client = first["adapter_bytes"] + first["optimizer_bytes"]
    table = Table(title=f"peak RSS vs clients ({model}); per-client state {per_client / MB:.1f} MB (adapter + AdamW)")
    for col in ("clients", "peak RSS MB", "growth MB", "predicted growth MB", "growth / predicted"):
        table.add_column(col, justify="right")
    for row in rows:
        growth = row["peak_rss"] - first["peak_rss"]
        predicted = (row["clients"] - first["clients"]) * per_client
        row["growth"], row["predicted_growth"] = growth, predicted
        row["ratio"] = growth / predicted if predicted else None
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        table.add_row(
            str(row["clients"]), f"{row['peak_rss'] / MB:.0f}", f"{growth / MB:.0f}", f"{predicted / MB:.0f}", ratio
        )
    Console().print(table)
    slope = _slope([r["clients"] for r in rows], [r["peak_rss"] for r in rows]) if len(rows) > 1 else float("nan")
    Console().print(
        f"least-squares growth: {slope / MB:.1f} MB per client = "
        f"{slope / per_client:.2f}x the predicted {per_client / MB:.1f}"
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(
        json.dumps({"model": model, "rounds": rounds, "rows": rows, "slope_per_client": slope}, indent=2)
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["clients"] for r in rows]
    ax.plot(xs, [r["peak_rss"] / MB for r in rows], marker="o", label="peak RSS")
    ax.plot(xs, [(first["peak_rss"] + r["predicted_growth"]) / MB for r in rows], "k--", label="prediction")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients")
    ax.set_ylabel("MB")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "memory.png", dpi=110)
    plt.close(fig)
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
