"""Repacking the decode weights after an optimizer step: one pass (``kernels.pack_sum``) against merge, concatenate
and pack, on the same model and adapter, alternating the two so machine load hits both alike.

    python benchmarks/repack.py                 # embedded SmolLM2-135M, LoRA r=16 on every projection, 7 repeats

Each repeat perturbs every LoRA factor (as an optimizer step does) and times ``LeanDecoder.load``, which repacks all
120 LoRA-targeted fused matmuls. Writes ``benchmarks/results/repack.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rollout import fused
from fedrl_lightning.rollout.decoder import LeanDecoder


def _perturb(module: GRPOModule, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))


def main(model: str = "embedded", lora_r: int = 16, repeats: int = 7, out: str = "benchmarks/results/repack.json"):
    from paired import provenance  # the command and wall time, for results_page.py

    start = time.perf_counter()
    module = GRPOModule(model=model, lora_r=lora_r, lora_alpha=2 * lora_r)
    decoder, gen = LeanDecoder(module.model), torch.Generator().manual_seed(0)
    one_pass = fused._low_rank_parts
    paths = {"merge, concatenate, pack (before)": lambda *a: None, "one pass (pack_sum)": one_pass}
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for i in range(repeats + 1):  # the first round is a warm-up
        for name, parts in paths.items():
            fused._low_rank_parts = parts
            _perturb(module, gen)
            start = time.perf_counter()
            repacked = decoder.load(module.model)
            if i:
                times[name].append(time.perf_counter() - start)
            outputs[name] = [layer["qkv"].weight.clone() for layer in decoder.layers[:2]]
    fused._low_rank_parts = one_pass
    median = {name: statistics.median(t) for name, t in times.items()}
    before, after = median["merge, concatenate, pack (before)"], median["one pass (pack_sum)"]
    table = Table(title=f"repack after an optimizer step ({repacked} fused matmuls, median of {repeats})")
    for col in ("path", "seconds", "speed-up"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, s in median.items():
        table.add_row(name, f"{s:.3f}", f"{before / s:.2f}x")
    Console().print(table)
    result = {
        "model": model,
        "lora_r": lora_r,
        "fused_matmuls": repacked,
        "seconds": times,
        "median_s": median,
        "speedup": before / after,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        **provenance(start),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
