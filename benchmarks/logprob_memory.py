"""Peak memory of one GRPO forward+backward with the dense logit block and with chunked log-probs.

    python benchmarks/logprob_memory.py                     # embedded model, 8 rows x 128 completion tokens
    python benchmarks/logprob_memory.py --chunk_sizes '[0, null, 32]'

Each mode runs in a fresh process: the policy (``logprob_chunk_size`` 0 = dense logits, null = the default chunk, n =
n tokens per chunk), a synthetic batch (``prompts`` prompts x ``num_generations`` completions of ``completion_tokens``
random tokens, all active), then one ``training_step`` and its backward. The resident set's high-water mark is reset
just before the step (``/proc/self/clear_refs``), so the peak is the step's own, not the model load's. The prediction:
the dense path holds the (rows x tokens x vocabulary) float32 logits, their log-softmax (saved for the backward) and,
in the backward, their gradient, about three logit blocks; the chunked path holds a (tokens x hidden) Jacobian and a
few (chunk x vocabulary) blocks at a time. So the step's peak should fall by two to three logit blocks less the chunk
working set. Loss and adapter gradient norm are printed per mode: they must agree (float rounding).
Writes ``benchmarks/results/logprob_memory.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import CLI
from procmem import reset_peak, status_kib
from rich.console import Console
from rich.table import Table

MB = 2**20


def child(chunk_size: int | None, model: str, prompts: int, num_generations: int, completion_tokens: int) -> dict:
    """One forward+backward in this process; returns its peak RSS over the RSS just before it."""
    import torch

    from fedrl_lightning.losses import default_chunk_size
    from fedrl_lightning.modules import GRPOModule
    from fedrl_lightning.rollout import Rollout

    torch.manual_seed(0)
    module = GRPOModule(
        model=model,
        num_generations=num_generations,
        prompts_per_step=prompts,
        micro_batch_size=prompts * num_generations,
        max_completion_length=completion_tokens,
        temperature=0.7,
        logprob_chunk_size=chunk_size,
    )
    config = module.model.get_base_model().config
    rows = prompts * num_generations
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, config.vocab_size, (prompts, 32), generator=gen).repeat_interleave(num_generations, 0)
    completion_ids = torch.randint(0, config.vocab_size, (rows, completion_tokens), generator=gen)
    ones = torch.ones_like
    rollout = Rollout(
        prompt_ids,
        ones(prompt_ids),
        completion_ids,
        ones(completion_ids),
        torch.zeros(rows, dtype=torch.bool),
        [""] * rows,
    )
    batch = module.make_batch(rollout, torch.randn(rows, 1, generator=gen))  # no model pass: one iteration, beta 0
    dtype = next(module.model.parameters()).dtype
    reset_peak()  # the high-water mark starts over from the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    loss = module.training_step(batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    grads = [p.grad for p in module.trainable_parameters().values() if p.grad is not None]
    return {
        "chunk_size": chunk_size,
        "effective_chunk": 0 if chunk_size == 0 else chunk_size or default_chunk_size(config.vocab_size),
        "rows": rows,
        "completion_tokens": completion_tokens,
        "vocab": config.vocab_size,
        "dtype": str(dtype),
        "logit_block_bytes": rows * completion_tokens * config.vocab_size * 4,  # upcast to float32 for the softmax
        "rss_before_bytes": before * 1024,
        "peak_bytes": peak * 1024,
        "step_peak_bytes": (peak - before) * 1024,
        "seconds": seconds,
        "loss": float(loss),
        "grad_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))),
    }


def main(
    chunk_sizes: list[int | None] = [0, None, 32],  # noqa: B006
    model: str = "embedded",
    prompts: int = 2,
    num_generations: int = 4,
    completion_tokens: int = 128,
    out: str = "benchmarks/results/logprob_memory.json",
    child_chunk: str = "",
) -> list[dict[str, Any]] | None:
    """Measure each ``logprob_chunk_size`` in a fresh process; print and write the table."""
    shape = dict(model=model, prompts=prompts, num_generations=num_generations, completion_tokens=completion_tokens)
    if child_chunk:  # internal: this process is one measurement
        chunk = None if child_chunk == "auto" else int(child_chunk)
        print(json.dumps(child(chunk, **shape)))
        return None
    from paired import provenance  # the parent only: the measured children do not import it

    start = time.perf_counter()
    rows = []
    for chunk in chunk_sizes:
        Console().print(f"logprob_memory: logprob_chunk_size={chunk}")
        args = [f"--{k}={v}" for k, v in shape.items()] + [f"--child_chunk={'auto' if chunk is None else chunk}"]
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"logprob_chunk_size={chunk} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    dense = next((r for r in rows if r["chunk_size"] == 0), rows[0])
    block = dense["logit_block_bytes"]
    title = (
        f"forward+backward peak RSS ({model}, {dense['rows']} rows x {completion_tokens} tokens, {dense['dtype']}); "
        f"logit block {block / MB:.0f} MB"
    )
    table = Table(title=title)
    for col in ("logprob_chunk_size", "chunk", "step peak MB", "saved MB", "saved / block", "s", "loss", "grad norm"):
        table.add_column(col, justify="right")
    for r in rows:
        r["saved_bytes"] = dense["step_peak_bytes"] - r["step_peak_bytes"]
        r["saved_blocks"] = r["saved_bytes"] / block
        table.add_row(
            "dense (0)" if r["chunk_size"] == 0 else "auto" if r["chunk_size"] is None else str(r["chunk_size"]),
            str(r["effective_chunk"]),
            f"{r['step_peak_bytes'] / MB:.0f}",
            f"{r['saved_bytes'] / MB:.0f}",
            f"{r['saved_blocks']:.2f}",
            f"{r['seconds']:.2f}",
            f"{r['loss']:.6e}",
            f"{r['grad_norm']:.6f}",
        )
    Console(width=160).print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**shape, "rows": rows, **provenance(start)}, indent=2))
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
