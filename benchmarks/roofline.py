"""The decode roofline of this machine for the policy model, and how close our rollout backends get to it.

    python benchmarks/roofline.py                       # embedded model, HFRollout's default (the lean decoder)
    python benchmarks/roofline.py --backends '[hf, hf_generate, hf_plain, hf_static_compile, hf_lora, vllm]'

``hf`` is the lean decode loop; ``hf_generate``/``hf_plain`` are HF ``generate`` on the merged copy with packed/plain
weights, ``hf_lora`` on the LoRA model itself.
``vllm*`` need the vllm extra. ``hf_static_compile`` decodes with a static KV cache and an inductor-compiled step;
``vllm_compile`` lets vLLM compile its model (``enforce_eager=False``).

Measures the machine's memory copy bandwidth and fp32 matmul rate, then for each batch size b computes the time of
one decode step as max(bytes read / bandwidth, FLOPs / matmul rate), with

    bytes read = weights (every parameter once per step; tied embeddings counted once) + KV cache (b sequences)
    FLOPs      = 2 x parameters x b  (+ attention: 4 x layers x heads x head_dim x context x b)

and its roofline tokens/s = b / step time. Achieved decode tokens/s is measured with every sequence forced to the
full length (``min_new_tokens``), minus the prefill (a 1-token generation of the same batch). Writes
``benchmarks/results/roofline.json`` and ``roofline.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table
from transformers import CompileConfig

from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.rollout import SamplingParams
from fedrl_lightning.rollout.hf import HFRollout, encode_prompts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROMPT = [{"role": "user", "content": "What is 37 + 45? Think briefly, then give the answer in <answer></answer>."}]


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), best of ``repeats``."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def matmul_rate(n: int = 1536, repeats: int = 5) -> float:
    """fp32 FLOP/s of an n x n matmul, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_costs(module: GRPOModule) -> dict[str, float]:
    """Parameter count and the per-token KV-cache bytes and attention FLOP factor of the base model."""
    base = module.model.get_base_model()
    cfg = base.config
    params = {id(p): p for p in base.parameters()}  # tied embeddings once
    n_params = sum(p.numel() for p in params.values() if not _is_lora(p, base))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    return {
        "params": float(n_params),
        "kv_bytes_per_token": 2.0 * cfg.num_hidden_layers * kv_heads * head_dim * 4,
        "attn_flops_per_ctx_token": 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim,
    }


def _is_lora(p: torch.Tensor, base: Any) -> bool:
    return any(p is q for n, q in base.named_parameters() if "lora_" in n)


def roofline_tokens_per_s(costs: dict[str, float], batch: int, context: int, bandwidth: float, rate: float) -> dict:
    bytes_read = 4 * costs["params"] + costs["kv_bytes_per_token"] * context * batch
    flops = 2 * costs["params"] * batch + costs["attn_flops_per_ctx_token"] * context * batch
    t_mem, t_compute = bytes_read / bandwidth, flops / rate
    return {"tokens_per_s": batch / max(t_mem, t_compute), "bound": "memory" if t_mem >= t_compute else "compute"}


def measure_decode(module: GRPOModule, backend: Any, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s at ``batch`` sequences, every one ``new_tokens`` long, the prefill subtracted."""

    def run(n: int) -> float:
        params = SamplingParams(
            num_generations=batch, max_completion_length=n, temperature=0.7, top_p=1.0, top_k=None, min_tokens=n
        )
        start = time.perf_counter()
        backend.generate(module, [PROMPT], params)
        return time.perf_counter() - start

    first = run(new_tokens)  # warm-up (and compilation, for a compiled backend)
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    prefill = statistics.median(run(1) for _ in range(repeats))
    decode = max(full - prefill, 1e-9)
    return {
        "seconds": full,
        "first_call_seconds": first,
        "prefill_seconds": prefill,
        "tokens_per_s": batch * (new_tokens - 1) / decode,
    }


def _backend(name: str, model: str) -> Any:
    if name == "hf":  # the default: the lean decode loop (fused packed weights, adapter merged at packing)
        return HFRollout()
    if name == "hf_generate":  # HF generate on the merged copy, its linears oneDNN-packed
        return HFRollout(lean_decoder=False, merged_copy=True)
    if name == "hf_plain":  # HF generate on the merged copy with plain weights
        return HFRollout(lean_decoder=False, merged_copy=True, packed_weights=False)
    if name == "hf_static_compile":  # plain merged copy, static KV cache, decode step compiled by inductor
        config = CompileConfig(fullgraph=False, mode="default", dynamic=False)
        config._compile_all_devices = True  # generate compiles only on accelerators unless told
        static = {"cache_implementation": "static", "compile_config": config}
        return HFRollout(lean_decoder=False, merged_copy=True, packed_weights=False, generate_kwargs=static)
    if name == "hf_lora":  # HF generate on the LoRA model itself
        return HFRollout(lean_decoder=False, merged_copy=False)
    if name in ("vllm", "vllm_compile"):
        from fedrl_lightning.rollout.vllm import VLLMRollout

        # One engine for every batch size; the adapter is merged into its weights. vllm_compile: vLLM's
        # torch.compile of the model (enforce_eager=False), compiled at engine start.
        return VLLMRollout(enforce_eager=name == "vllm", sync_method="merge")
    names = "hf, hf_generate, hf_plain, hf_static_compile, hf_lora, vllm or vllm_compile"
    raise ValueError(f"unknown backend {name!r}: {names}")


def main(
    model: str = "embedded",
    backends: list[str] = ["hf"],  # noqa: B006
    batches: list[int] = [1, 8, 32],  # noqa: B006
    new_tokens: int = 48,
    repeats: int = 3,
    out: str = "benchmarks/results",
) -> dict[str, Any]:
    """Measure the machine, compute the roofline per batch size, and the achieved decode rate of each backend."""
    torch.manual_seed(0)
    module = GRPOModule(model=model, lora_r=16, lora_alpha=32, num_generations=8, max_completion_length=new_tokens)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for name, p in module.trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    costs = model_costs(module)
    prompt_len = int(encode_prompts(module.tokenizer, [PROMPT])["attention_mask"].sum())
    context = prompt_len + new_tokens // 2  # the mean context over the decode
    instances = {name: _backend(name, model) for name in backends}
    rows = []
    for b in batches:
        row: dict[str, Any] = {"batch": b, **roofline_tokens_per_s(costs, b, context, bandwidth, rate)}
        for name in backends:
            row[name] = measure_decode(module, instances[name], b, new_tokens, repeats)
            row[name]["fraction"] = row[name]["tokens_per_s"] / row["tokens_per_s"]
        rows.append(row)
        Console().print(row)
    machine = {"copy_GBps": bandwidth / 1e9, "matmul_GFLOPs": rate / 1e9, "threads": torch.get_num_threads()}
    table = Table(
        title=f"decode roofline: {costs['params'] / 1e6:.0f}M params fp32, copy {machine['copy_GBps']:.1f} GB/s, "
        f"matmul {machine['matmul_GFLOPs']:.0f} GFLOP/s, context ~{context}"
    )
    for col in ("batch", "roofline tok/s", "bound", *[f"{n} tok/s (fraction)" for n in backends]):
        table.add_column(col, justify="right")
    for row in rows:
        cells = [f"{row[n]['tokens_per_s']:.1f} ({row[n]['fraction']:.0%})" for n in backends]
        table.add_row(str(row["batch"]), f"{row['tokens_per_s']:.0f}", row["bound"], *cells)
    Console(width=160).print(table)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"config": {"model": model, "new_tokens": new_tokens, "context": context}, "machine": machine}
    result.update({"costs": costs, "rows": rows})
    (out_dir / "roofline.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["tokens_per_s"] for r in rows], "k--", marker="o", label="roofline")
    for name in backends:
        ax.plot(batches, [r[name]["tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "roofline.png", dpi=110)
    plt.close(fig)
    return result


if __name__ == "__main__":
    CLI(main, as_positional=False)
