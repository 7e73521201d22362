"""Our GRPO step against TRL's ``GRPOTrainer`` step on the same work, A/B in one process.

    make bench-trl           # installs TRL into .venv-trl (never a project dependency), then runs this
    PYTHONPATH=.venv-trl .venv/bin/python benchmarks/vs_trl.py --steps 4 --backend vllm

``--backend hf`` (the default) is ``HFRollout``, the trainer's default: on CPU the lean decode loop, which outruns
vLLM's CPU backend here (``benchmarks/NOTES.md``).

Same model (the embedded SmolLM2-135M, float32), LoRA (r=16, alpha=32, all linear layers), prompts (reasoning-gym
``basic_arithmetic``), reward (``accuracy_reward``), ``num_generations``, completions per step, temperature,
``max_completion_length``, loss (``dapo``, beta 0, one iteration) and optimizer (AdamW, constant lr, clip 1.0) on
both sides. TRL trains through ``trainer.train()``; a ``TrainerCallback`` times each of its steps (generation
included: TRL generates inside ``training_step``) and, right after each, runs and times one of our steps, so the
two alternate under the same machine load. The first ``warmup`` steps of each (engine start, allocator warm-up)
are not counted.

Loss check: at the first timed TRL step its ``_compute_loss`` inputs are captured (with seeded random advantages,
so the loss is never trivially zero, and for ``beta > 0`` a seeded reference: the policy's log-probs plus N(0, 0.1²)
noise, since after ``warmup`` steps the adapter is still so close to the base model that the real reference would
make the KL term vanish). For every ``loss_type`` (grpo, bnpo, dr_grpo, dapo), ``beta`` in {0, 0.04} and
``use_bias_correction_kl`` on and off, TRL's own ``_compute_loss`` (its ``loss_type``, ``beta`` and
``args.use_bias_correction_kl`` set for the call) gives the loss and the adapter's gradient; our module, given TRL's
adapter weights at that moment and the same settings, computes per-token log-probs, the loss and its gradient for
the same prompt/completion ids, advantages and reference. The loss difference must be within ``loss_tolerance``, the
log-prob difference and the gradient's relative difference within ``tolerance``.

Our per-phase breakdown comes from the module's timers (generate, reward, old/ref log-probs, forward/backward,
optimizer) plus the federated pieces measured here on the same adapter: a client state swap (adapter + AdamW
state out and in), a FedAvg aggregation of ``clients`` adapters, and the vLLM weight sync (inside generate).
Writes ``benchmarks/results/vs_trl.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table
from torch import Tensor

from fedrl_lightning.aggregation import ClientUpdate, FedAvg
from fedrl_lightning.client import local_step
from fedrl_lightning.client_state import ClientStateBank, load_optimizer, optimizer_groups, optimizer_tensors
from fedrl_lightning.data import FederatedData
from fedrl_lightning.models import embedded_model_dir
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.modules.grpo import GRPOBatch
from fedrl_lightning.rewards import accuracy_reward
from fedrl_lightning.rollout import Rollout
from fedrl_lightning.rollout.hf import HFRollout

PHASES = ("generate", "reward", "old_ref_log_probs", "forward_backward", "optimizer")
# (loss_type, beta, use_bias_correction_kl) of the loss check; at beta 0 the correction has no KL term to act on.
LOSS_CASES = [(t, beta, c) for t in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04) for c in (True, False)]
# One-digit sums: the base model solves about a quarter of them, so rewards differ within a group, advantages are
# non-zero and the adapter (and with vLLM the engine's weights) changes every step, as in real training.
TASK_KWARGS = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}


def _trl() -> Any:
    try:
        import trl
    except ImportError as err:  # the benchmark's own environment, not the project's
        raise SystemExit("TRL is not importable: run `make bench-trl` (installs it into .venv-trl)") from err
    return trl


def _our_backend(name: str) -> tuple[Any, Any]:
    """(rollout backend, weight sync or None)."""
    if name == "hf":
        return HFRollout(), None
    from fedrl_lightning.rollout.vllm import VLLMRollout

    backend = VLLMRollout(enable_lora=False, sync_method="merge")
    return backend, backend.weight_sync


def _peft_suffix(name: str) -> str:
    """A PEFT parameter name without its wrapper prefixes (ours sits under ``model.``, TRL's is bare)."""
    return name.split("base_model.model.", 1)[-1]


def _trl_losses(trainer: Any, compute_loss: Any, model: Any, probe: dict[str, Any]) -> dict[tuple, dict]:
    """TRL's loss and adapter gradient on ``probe`` for every ``LOSS_CASES`` entry, its settings restored after."""
    args, saved = trainer.args, (trainer.loss_type, trainer.beta, trainer.args.use_bias_correction_kl)
    lora = {_peft_suffix(n): p for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = {}
    try:
        for case in LOSS_CASES:
            trainer.loss_type, trainer.beta, args.use_bias_correction_kl = case
            loss = compute_loss(model, probe)
            grads = dict(zip(lora, torch.autograd.grad(loss, list(lora.values()))))
            out[case] = {"loss": float(loss.detach()), "grads": grads}
    finally:
        trainer.loss_type, trainer.beta, args.use_bias_correction_kl = saved
    return out


def _check_loss(
    module: GRPOModule, trl_model: Any, inputs: dict[str, Any], trl_log_probs: Tensor, trl: dict[tuple, dict]
) -> dict:
    """Our log-probs, and per ``LOSS_CASES`` entry our loss and adapter gradient, on TRL's captured inputs with
    TRL's adapter weights copied in; compared with TRL's (``trl`` from ``_trl_losses``).

    With one iteration the ratio is exactly 1, so the loss value alone barely depends on the model: the log-probs
    and the gradient are what show the two compute the same thing.
    """
    keep = module.trainable_state()
    settings = (module.loss_type, module.beta, module.use_bias_correction_kl)
    theirs = {_peft_suffix(n): p.detach() for n, p in trl_model.named_parameters() if "lora_" in n}
    module.load_trainable_state({n: theirs[_peft_suffix(n)] for n in keep})
    cases = []
    try:
        mask = inputs["completion_mask"]
        rollout = Rollout(
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            mask,
            torch.zeros(len(mask), dtype=torch.bool),
            [""] * len(mask),
        )
        advantages = inputs["advantages"].view(-1)
        params = module.trainable_parameters()
        batch = GRPOBatch(rollout, advantages, mask, None, None, float(mask.sum()))
        log_probs, old = module.policy_log_probs(batch)  # one forward serves every case
        for loss_type, beta, correction in LOSS_CASES:
            module.loss_type, module.beta, module.use_bias_correction_kl = loss_type, beta, correction
            ref = inputs["ref_per_token_logps"] if beta else None
            batch = GRPOBatch(rollout, advantages, mask, None, ref, float(mask.sum()))
            loss = module.policy_loss(batch, log_probs, old, advantages)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)))
            ours_g = torch.cat([grads[n].flatten() for n in sorted(grads)])
            t = trl[(loss_type, beta, correction)]
            trl_g = torch.cat([t["grads"][_peft_suffix(n)].flatten() for n in sorted(grads)])
            cases.append(
                {
                    "loss_type": loss_type,
                    "beta": beta,
                    "use_bias_correction_kl": correction,
                    "trl_loss": t["loss"],
                    "our_loss": float(loss.detach()),
                    "loss_abs_diff": abs(float(loss.detach()) - t["loss"]),
                    "grad_rel_diff": float((ours_g - trl_g).norm() / trl_g.norm().clamp(min=1e-30)),
                    "grad_norm": float(trl_g.norm()),
                }
            )
    finally:
        module.load_trainable_state(keep)
        module.loss_type, module.beta, module.use_bias_correction_kl = settings
        module.tracker.compute_and_reset()
    m = mask.bool()
    return {
        "log_prob_max_abs_diff": float((log_probs.detach()[m] - trl_log_probs[m]).abs().max()),
        "tokens": int(m.sum()),
        "loss_abs_diff": max(c["loss_abs_diff"] for c in cases),
        "grad_rel_diff": max(c["grad_rel_diff"] for c in cases),
        "cases": cases,
    }


def _federated_overheads(module: GRPOModule, optimizer: Any, clients: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one client state swap and one FedAvg of ``clients`` adapters on this adapter.

    The swap does what ``Client.run_round`` does with the state: the leaving client's optimizer state is written into
    its row of the ``ClientStateBank``, and the next client's adapter and optimizer state are copied into the live
    tensors."""
    bank = ClientStateBank([0, 1])
    bank.write("optimizer", 1, optimizer_tensors(optimizer))  # the arriving client's state from its last round
    state = module.trainable_state()
    swaps, aggs = [], []
    agg = FedAvg()
    for _ in range(repeats):
        start = time.perf_counter()
        adapter = module.trainable_state()  # the update's own copy, as in run_round
        bank.write("optimizer", 0, optimizer_tensors(optimizer))  # the leaving client's state, written out
        module.load_trainable_state(state)
        load_optimizer(optimizer, bank.read("optimizer", 1), optimizer_groups(optimizer))
        swaps.append(time.perf_counter() - start)
        updates = [ClientUpdate(client_id=i, state=adapter, num_samples=1) for i in range(clients)]
        start = time.perf_counter()
        agg.aggregate(state, updates)
        aggs.append(time.perf_counter() - start)
    return {"state_swap": statistics.median(swaps), "aggregation": statistics.median(aggs)}


def main(
    steps: int = 6,
    warmup: int = 1,
    num_generations: int = 8,
    prompts_per_step: int = 1,
    max_completion_length: int = 48,
    temperature: float = 0.7,
    learning_rate: float = 1e-5,
    lora_r: int = 16,
    backend: Literal["hf", "vllm"] = "hf",
    clients: int = 4,
    tolerance: float = 1e-4,
    loss_tolerance: float = 1e-6,
    seed: int = 0,
    out: str = "benchmarks/results/vs_trl.json",
) -> dict[str, Any]:
    """Alternate ``warmup + steps`` TRL steps with as many of ours; print medians, ratio, phases, the loss check.

    ``tolerance`` bounds the log-prob difference and the gradient's relative difference, ``loss_tolerance`` the loss
    difference of every case of the loss check."""
    start = time.perf_counter()
    trl = _trl()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    L.seed_everything(seed, verbose=False)
    total = warmup + steps
    n = total * prompts_per_step
    data = FederatedData(tasks=["basic_arithmetic"], num_clients=1, train_size=n, eval_size=1, task_kwargs=TASK_KWARGS)
    data.setup("fit")
    examples = data.train_examples(0)
    model_dir = str(embedded_model_dir())

    module = GRPOModule(
        model="embedded",
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        num_generations=num_generations,
        prompts_per_step=prompts_per_step,
        micro_batch_size=num_generations * prompts_per_step,
        max_completion_length=max_completion_length,
        temperature=temperature,
        learning_rate=learning_rate,
        loss_type="dapo",
        reward_funcs=[accuracy_reward],
        accuracy_func=accuracy_reward,
    )
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module, optimizer = fabric.setup(module, module.configure_optimizers())
    ours_backend, sync = _our_backend(backend)

    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_"),
        use_cpu=True,
        max_steps=total,
        per_device_train_batch_size=num_generations * prompts_per_step,
        gradient_accumulation_steps=1,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        loss_type="dapo",
        beta=0.0,
        num_iterations=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=seed,
        bf16=False,
        shuffle_dataset=False,
    )
    dataset = Dataset.from_list([{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in examples])
    trl_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(
        r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = trl.GRPOTrainer(
        model=trl_model,
        reward_funcs=[accuracy_reward],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
    )

    rows: list[dict[str, Any]] = []
    check: dict[str, Any] = {}
    original = trainer._compute_loss

    def capturing_compute_loss(model: Any, inputs: dict[str, Any]) -> Any:
        loss = original(model, inputs)
        if not check and len(rows) >= warmup:
            # Seeded advantages instead of the step's own: a batch whose rewards are all equal has zero advantages,
            # and a zero loss would check nothing.
            gen = torch.Generator().manual_seed(seed)
            probe = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
            probe["advantages"] = torch.randn(probe["advantages"].shape, generator=gen)
            with torch.no_grad():
                ids = torch.cat([probe["prompt_ids"], probe["completion_ids"]], dim=1)
                att = torch.cat([probe["prompt_mask"], probe["completion_mask"]], dim=1)
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, ids, att, probe["completion_ids"].size(1)
                )
            # A reference the KL term can see (see the module docstring); only read when beta > 0.
            probe["ref_per_token_logps"] = logps + 0.1 * torch.randn(logps.shape, generator=gen)
            trl_losses = _trl_losses(trainer, original, model, probe)
            check.update(_check_loss(module, trainer.model, probe, logps, trl_losses))
        return loss

    trainer._compute_loss = capturing_compute_loss

    class AlternateWithOurs(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            trl_s = time.perf_counter() - self.start
            i = len(rows)
            batch = examples[i * prompts_per_step : (i + 1) * prompts_per_step]
            torch.manual_seed(seed + i)
            synced = sync.totals["sync/seconds"] if sync is not None else 0.0
            start = time.perf_counter()
            tokens = local_step(fabric, module, optimizer, ours_backend, batch)
            ours_s = time.perf_counter() - start
            m = module.tracker.compute_and_reset()
            row = {"trl_s": trl_s, "ours_s": ours_s, "ours_tokens": tokens, **{p: m[f"timing/{p}"] for p in PHASES}}
            if sync is not None:  # sync time in this step: the check, plus a push when the adapter changed
                row["sync"] = sync.totals["sync/seconds"] - synced
            rows.append(row)
            Console().print(f"step {i}: TRL {trl_s:.2f} s, ours {ours_s:.2f} s")

    trainer.add_callback(AlternateWithOurs())
    trainer.train()
    # TRL logs its completion lengths once per step (logging_steps=1).
    trl_tokens = [
        h["completions/mean_length"] * num_generations * prompts_per_step
        for h in trainer.state.log_history
        if "completions/mean_length" in h
    ]

    timed = rows[warmup:]
    med = {k: statistics.median(r.get(k, 0.0) for r in timed) for k in ("trl_s", "ours_s", "ours_tokens", *PHASES)}
    med["sync"] = statistics.median(r.get("sync", 0.0) for r in timed)
    trl_tok = statistics.median(trl_tokens[warmup:total]) if len(trl_tokens) > warmup else float("nan")
    med.update(_federated_overheads(module, optimizer, clients))
    result = {
        "config": {
            "steps": steps,
            "warmup": warmup,
            "num_generations": num_generations,
            "prompts_per_step": prompts_per_step,
            "max_completion_length": max_completion_length,
            "temperature": temperature,
            "lora_r": lora_r,
            "backend": backend,
            "clients": clients,
            "trl": trl.__version__,
        },
        "machine": {"processor": platform.processor(), "threads": torch.get_num_threads()},
        "median": med,
        "speedup": med["trl_s"] / med["ours_s"],
        # A round of ``clients`` clients x one step each: every client swaps, the server aggregates once.
        "federated_overhead_share": (clients * med["state_swap"] + med["aggregation"])
        / (clients * (med["ours_s"] + med["state_swap"]) + med["aggregation"]),
        "trl_completion_tokens_per_step": trl_tok,
        "loss_check": check,
        "steps": rows,
    }
    _print(result, tolerance, loss_tolerance)
    from paired import provenance  # the command and wall time, for results_page.py

    result.update(provenance(start))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    if (
        not check
        or check["loss_abs_diff"] > loss_tolerance
        or max(check["log_prob_max_abs_diff"], check["grad_rel_diff"]) > tolerance
    ):
        raise SystemExit(f"loss check failed (tolerance {tolerance}, loss tolerance {loss_tolerance}): {check}")
    return result


def _print(result: dict[str, Any], tolerance: float, loss_tolerance: float) -> None:
    med, cfg = result["median"], result["config"]
    console = Console(width=140)
    work = (
        f"{cfg['prompts_per_step']} prompt(s) x G={cfg['num_generations']}, {cfg['max_completion_length']} new tokens"
    )
    table = Table(title=f"GRPO step, SmolLM2-135M LoRA r={cfg['lora_r']}, {work} (TRL {cfg['trl']})")
    for col in ("", "median s/step", "completion tokens/s", "ratio"):
        table.add_column(col, justify="right")
    trl_tps = result["trl_completion_tokens_per_step"] / med["trl_s"]
    table.add_row("TRL GRPOTrainer (HF generate)", f"{med['trl_s']:.2f}", f"{trl_tps:.1f}", "1.00x")
    our_tps = med["ours_tokens"] / med["ours_s"]
    table.add_row(
        f"fedrl-lightning ({cfg['backend']})", f"{med['ours_s']:.2f}", f"{our_tps:.1f}", f"{result['speedup']:.2f}x"
    )
    console.print(table)
    phases = Table(title="our step by phase (median s)")
    phases.add_column("phase")
    phases.add_column("s", justify="right")
    phases.add_column("share", justify="right")
    names = (*PHASES, "sync", "state_swap", "aggregation")
    for name in names:
        note = " (inside generate)" if name == "sync" else ""
        phases.add_row(name + note, f"{med[name]:.3f}", f"{med[name] / med['ours_s']:.1%}")
    console.print(phases)
    console.print(
        f"federated overhead of a {cfg['clients']}-client round (one local step each, swap + aggregation): "
        f"{result['federated_overhead_share']:.1%} of the round"
    )
    c = result["loss_check"]
    if c:
        cases = Table(title="loss check on TRL's captured inputs: TRL's _compute_loss vs our GRPOModule.policy_loss")
        for col in ("loss_type", "beta", "bias-corrected KL", "TRL loss", "our loss", "|diff|", "grad rel diff"):
            cases.add_column(col, justify="right")
        for row in c["cases"]:
            cases.add_row(
                row["loss_type"],
                f"{row['beta']:g}",
                "on" if row["use_bias_correction_kl"] else "off",
                f"{row['trl_loss']:.8f}",
                f"{row['our_loss']:.8f}",
                f"{row['loss_abs_diff']:.1e}",
                f"{row['grad_rel_diff']:.1e}",
            )
        console.print(cases)
        console.print(
            f"per-token log-probs max |diff| {c['log_prob_max_abs_diff']:.2e} over {c['tokens']} tokens; "
            f"max loss |diff| {c['loss_abs_diff']:.2e} (tolerance {loss_tolerance}); "
            f"max adapter gradient relative difference {c['grad_rel_diff']:.2e} (tolerance {tolerance})"
        )


if __name__ == "__main__":
    CLI(main, as_positional=False)
