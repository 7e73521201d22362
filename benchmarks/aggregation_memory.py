"""Peak memory of aggregating k client updates: streaming (fold each as it arrives) against buffering them all.

    python benchmarks/aggregation_memory.py                        # k = 2, 8, 32 updates of 20 MB, FedAvg and FedAdam
    python benchmarks/aggregation_memory.py --ks '[2, 64]' --update_mb 40

No model: synthetic LoRA-shaped float32 adapters (A: r x d and B: d x r per module, r = 16, d = 2048) of
``update_mb`` MB each, made one at a time by a generator (the producer keeps none), go through the server's own
aggregation step (``fedrl_lightning.aggregation.rounds.RoundAggregation``: ``add`` each, then ``finish``), as a round
of the in-process transport hands them over. ``buffered`` is the same aggregator forced to buffer (as a callback
implementing ``on_before_aggregate`` makes the server do). Each (aggregator, mode, k) runs in its own process; the
figure is the growth of its peak resident set size (``VmHWM``, reset just before the round) over the RSS then (the
global adapter already made), so it counts every tensor the round holds at once. glibc's mmap threshold is fixed at
64 KiB in the children (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS (with its default dynamic
threshold, freed heap chunks stay resident and fragment, which adds noise of a few tens of MB).

Prediction, with U the update size: buffered ~ k U (every update) + 2 U (the float64 sum) + transients; streaming ~
U (the update being folded) + 2 U, whatever k. FedAdam's step adds its float64 moments m and v and the step's
temporaries (~4 U each round, also independent of k). Writes ``benchmarks/results/aggregation_memory.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import CLI
from procmem import reset_peak, status_mb
from rich.console import Console
from rich.table import Table

MB = 2**20
RANK, DIM = 16, 2048


def child(aggregator: str, mode: str, k: int, update_mb: float) -> dict[str, Any]:
    """One round of ``k`` synthetic updates through the server's aggregation step; returns the peak RSS growth."""
    import torch

    from fedrl_lightning.aggregation import ClientUpdate, FedAdam, FedAvg
    from fedrl_lightning.aggregation.rounds import RoundAggregation

    torch.set_num_threads(1)
    modules = max(1, round(update_mb * MB / (2 * RANK * DIM * 4)))
    global_state = {}
    for i in range(modules):
        global_state[f"layers.{i}.proj.lora_A.default.weight"] = torch.zeros(RANK, DIM)
        global_state[f"layers.{i}.proj.lora_B.default.weight"] = torch.zeros(DIM, RANK)
    update_bytes = sum(t.numel() * t.element_size() for t in global_state.values())

    def updates():  # one at a time: nothing here holds an update once it is handed over
        gen = torch.Generator().manual_seed(0)
        for cid in range(k):
            yield ClientUpdate(
                cid,
                {name: torch.randn(t.shape, generator=gen) * 1e-3 for name, t in global_state.items()},
                num_samples=1 + cid % 3,
            )

    class WantsEveryUpdate:  # makes the server's aggregation buffer
        def on_before_aggregate(self, updates): ...

    agg = FedAvg() if aggregator == "FedAvg" else FedAdam(eta=1e-3)
    callbacks = [WantsEveryUpdate()] if mode == "buffered" else []
    reset_peak()  # the imports' transient peak does not count
    rss_before = status_mb("VmRSS")
    round_agg = RoundAggregation(agg, global_state, callbacks)
    assert round_agg.streaming == (mode == "streaming")
    kept = []
    for update in updates():  # as the server's round loop: fold, keep the summary, let the update go
        kept.append(round_agg.add(update))
        del update
    new = round_agg.finish()
    peak = status_mb("VmHWM")
    assert len(kept) == k and new.keys() == global_state.keys()
    return {
        "aggregator": aggregator,
        "mode": mode,
        "k": k,
        "update_mb": update_bytes / MB,
        "peak_growth_mb": peak - rss_before,
        "rss_before_mb": rss_before,
        "peak_mb": peak,
    }


def main(
    ks: list[int] = [2, 8, 32],  # noqa: B006  (jsonargparse reads the default)
    update_mb: float = 20.0,
    aggregators: list[str] = ["FedAvg", "FedAdam"],  # noqa: B006
    out: str = "benchmarks/results/aggregation_memory.json",
) -> list[dict[str, Any]]:
    """Every (aggregator, mode, k) in its own process; prints the table and writes ``out``."""
    from paired import provenance  # here, not at the top: the measured child processes import this module

    start = time.perf_counter()
    rows = []
    for aggregator in aggregators:
        for mode in ("buffered", "streaming"):
            for k in ks:
                code = (
                    "import json, sys; sys.path.insert(0, 'benchmarks'); from aggregation_memory import child; "
                    f"print(json.dumps(child({aggregator!r}, {mode!r}, {k}, {update_mb})))"
                )
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # freed tensors go back to the OS
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(title=f"Peak RSS growth of one round's aggregation, updates of {rows[0]['update_mb']:.1f} MB")
    for col in ("aggregator", "mode", *(f"k={k}" for k in ks), "growth k_max / k_min"):
        table.add_column(col, justify="right")
    for aggregator in aggregators:
        for mode in ("buffered", "streaming"):
            mine = {r["k"]: r["peak_growth_mb"] for r in rows if r["aggregator"] == aggregator and r["mode"] == mode}
            ratio = mine[max(ks)] / mine[min(ks)] if mine[min(ks)] > 0 else float("nan")
            table.add_row(aggregator, mode, *(f"{mine[k]:.0f} MB" for k in ks), f"{ratio:.2f}x")
    Console().print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"ks": ks, "update_mb": update_mb, "rows": rows, **provenance(start)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
