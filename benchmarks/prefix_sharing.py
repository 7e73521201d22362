"""Forward + backward of one GRPO batch with and without the shared prompt prefix, alternating, same rollout.

    python benchmarks/prefix_sharing.py                  # embedded model, 4 prompts x G=8, 48 new tokens
    python benchmarks/prefix_sharing.py --prompts 1 --repeats 5

``PolicyModule(share_prompt_prefix=True)`` runs each prompt once and lets its G completions attend to the shared
KV cache. The prediction is the ratio of matmul work: the transformer body runs on ``B x (P + C)`` token positions
unshared against ``U x P + B x (C - 1)`` shared (U distinct prompts per micro-batch, B rows), and the vocabulary
head on the ``B x C`` completion positions either way; forward and backward are matmul-bound on this machine, so
time should follow it (less attention, log-softmax and per-call costs, which the prediction leaves out).
Writes ``benchmarks/results/prefix_sharing.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rollout.hf import HFRollout


def _fwd_bwd(module: GRPOModule, args: tuple[torch.Tensor, ...], micro: int) -> float:
    start = time.perf_counter()
    for s in range(0, args[0].shape[0], micro):
        chunk = tuple(a[s : s + micro] for a in args)
        log_probs, _ = module.completion_log_probs(*chunk, temperature=0.7)
        (log_probs * chunk[3]).sum().backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(
    model: str = "embedded",
    prompts: int = 4,
    num_generations: int = 8,
    max_completion_length: int = 48,
    micro_batch_size: int = 16,
    repeats: int = 3,
    out: str = "benchmarks/results/prefix_sharing.json",
) -> dict:
    """Time ``repeats`` forward+backward passes each way, alternating, after one warm-up of each."""
    torch.manual_seed(0)
    module = GRPOModule(
        model=model, num_generations=num_generations, max_completion_length=max_completion_length, temperature=0.7
    )
    data = FederatedData(
        tasks=["basic_arithmetic"],
        num_clients=1,
        train_size=prompts,
        eval_size=1,
        task_kwargs={"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
    )
    data.setup("fit")
    rollout = HFRollout().generate(module, [ex["prompt"] for ex in data.train_examples(0)], module.sampling)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    b, p = rollout.prompt_ids.shape
    c = rollout.completion_ids.shape[1]
    module.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for share in (False, True) if i % 2 else (True, False):
            module.share_prompt_prefix = share
            elapsed = _fwd_bwd(module, args, micro_batch_size)
            if i:
                times[share].append(elapsed)
    unshared, shared = statistics.median(times[False]), statistics.median(times[True])
    micro_rows = min(micro_batch_size, b)
    groups = -(-micro_rows // num_generations)  # distinct prompts per micro-batch
    cfg = module.model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(q.numel() for q in module.model.parameters()) - head - (0 if cfg.tie_word_embeddings else head)
    work_unshared = micro_rows * (p + c) * body + micro_rows * c * head
    predicted = work_unshared / ((groups * p + micro_rows * (c - 1)) * body + micro_rows * c * head)
    result = {
        "config": {
            "model": model,
            "prompts": prompts,
            "num_generations": num_generations,
            "prompt_tokens": p,
            "completion_tokens": c,
            "micro_batch_size": micro_batch_size,
        },
        "unshared_s": unshared,
        "shared_s": shared,
        "speedup": unshared / shared,
        "predicted_speedup": predicted,
        "runs": {"unshared": times[False], "shared": times[True]},
    }
    table = Table(title=f"forward+backward, {b} rows = {prompts} prompts x G={num_generations}, P={p}, C={c}")
    for col in ("", "median s", "speedup", "predicted (matmul work)"):
        table.add_column(col, justify="right")
    table.add_row("prompt repeated per row", f"{unshared:.2f}", "1.00x", "")
    table.add_row("shared prompt prefix", f"{shared:.2f}", f"{unshared / shared:.2f}x", f"{predicted:.2f}x")
    Console().print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
