"""Median wall time of one GRPO step on the embedded model, by phase.

    python benchmarks/step_time.py                       # SmolLM2-135M, G=8, 64 new tokens, LoRA r=16
    python benchmarks/step_time.py --steps 5 --prompts 2
    python benchmarks/step_time.py --profile true --precision bf16-mixed   # + the top operators of the last step

Writes ``benchmarks/results/step_time.json``. Absolute times depend on the machine (and its other load);
compare phases within one run.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from fedrl_lightning.client import local_step, timed
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rewards import answer_tag_reward, reasoning_gym_reward
from fedrl_lightning.rollout.hf import HFRollout

PHASES = ("generate", "reward", "old_ref_log_probs", "forward_backward", "optimizer")


def main(
    model: str = "embedded",
    prompts: int = 4,
    num_generations: int = 8,
    max_completion_length: int = 64,
    lora_r: int = 16,
    steps: int = 3,
    warmup: int = 1,
    precision: str = "32-true",
    profile: bool = False,
    top: int = 25,
    out: str = "benchmarks/results/step_time.json",
) -> dict:
    """Time ``steps`` GRPO steps after ``warmup`` and print the median per phase (``precision``: Fabric's, e.g.
    ``bf16-mixed``: the forward and backward under CPU autocast, bfloat16 matmuls where the CPU has AMX).

    ``profile``: run the last step under ``torch.profiler`` and print its ``top`` operators by self CPU time (the
    table also goes to ``<out stem>_profile_<precision>.txt``); that step's times include the profiler's overhead.
    """
    start = time.perf_counter()
    module = GRPOModule(
        model=model,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        num_generations=num_generations,
        prompts_per_step=prompts,
        micro_batch_size=prompts * num_generations,
        max_completion_length=max_completion_length,
        reward_funcs=[reasoning_gym_reward, answer_tag_reward],
        reward_weights=[1.0, 0.1],
    )
    data = FederatedData(
        tasks=["basic_arithmetic"],
        num_clients=1,
        train_size=64,
        eval_size=1,
        task_kwargs={"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
    )
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    module, optimizer = fabric.setup(module, module.configure_optimizers())
    examples, backend = data.train_examples(0), HFRollout()
    rows, prof = [], None
    for i in range(warmup + steps):
        batch = examples[i * prompts : (i + 1) * prompts]
        last = i == warmup + steps - 1
        if profile and last:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        with prof or contextlib.nullcontext(), timed(module.tracker, "step"):
            tokens = local_step(fabric, module, optimizer, backend, batch)
        m = module.tracker.compute_and_reset()
        if i >= warmup:
            rows.append(
                {
                    **{p: m[f"timing/{p}"] for p in (*PHASES, "step")},
                    "completion_tokens": tokens,
                    "mean_length": m["completions/mean_length"],
                }
            )
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {
        "config": {
            "model": model,
            "prompts": prompts,
            "num_generations": num_generations,
            "max_completion_length": max_completion_length,
            "lora_r": lora_r,
            "steps": steps,
            "precision": precision,
        },
        "machine": {"processor": platform.processor(), "threads": torch.get_num_threads()},
        "median": median,
        "steps": rows,
    }
    from paired import provenance  # the command and wall time, as every benchmark records them

    result.update(provenance(start))
    table = Table(title=f"GRPO step ({prompts} prompts x G={num_generations}, {max_completion_length} new tokens)")
    table.add_column("phase")
    table.add_column("median s", justify="right")
    table.add_column("share", justify="right")
    for phase in PHASES:
        table.add_row(phase, f"{median[phase]:.2f}", f"{median[phase] / median['step']:.0%}")
    other = median["step"] - sum(median[p] for p in PHASES)
    table.add_row("other (batching, metrics)", f"{other:.2f}", f"{other / median['step']:.0%}")
    table.add_row("step", f"{median['step']:.2f}", "100%")
    gen_tps = median["completion_tokens"] / median["generate"]
    Console().print(table)
    Console().print(f"completion tokens/step {median['completion_tokens']:.0f}; generation {gen_tps:.1f} tokens/s")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    if prof is not None:
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
        print(ops)
        path = Path(out).with_name(f"{Path(out).stem}_profile_{precision}.txt")
        path.write_text(ops)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
