"""``fedrl eval RUN_DIR`` and ``fedrl export RUN_DIR --output DIR``: use a finished run's adapter(s).

A run directory holds ``config.yaml`` (the resolved config) and the final adapter: ``adapter/`` (federated) or
``adapters/client<i>/`` (local-only, one per client), each in PEFT format with a portable
``base_model_name_or_path``. ``eval`` rebuilds the module, data and rollout from the config and prints every client's
greedy accuracy under its final adapter, as the run's own evaluation computes it. ``export`` merges an adapter into
its base and writes a standalone checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from fedrl_lightning.client import evaluate
from fedrl_lightning.models import load_base, load_tokenizer, resolve_dtype
from fedrl_lightning.rollout.hf import HFRollout

SPLITS = ("eval", "train")


def adapter_dirs(run_dir: str | Path) -> dict[int | None, Path]:
    """The run's final adapters: ``{None: adapter/}`` (federated) or ``{cid: adapters/client<cid>/}`` (local-only).

    Raises:
        FileNotFoundError: ``run_dir`` holds no final adapter (not a run directory, or a run that completed no round).
    """
    run_dir = Path(run_dir)
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return {None: run_dir / "adapter"}
    own = {
        int(path.parent.name.removeprefix("client")): path.parent
        for path in (run_dir / "adapters").glob("client*/adapter_config.json")
    }
    if not own:
        raise FileNotFoundError(
            f"{run_dir} holds no final adapter (adapter/ or adapters/client<i>/): not a finished run"
        )
    return dict(sorted(own.items()))


def load_run(run_dir: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(module, data, rollout, trainer arguments)`` rebuilt from ``run_dir/config.yaml`` as ``fedrl fit`` would."""
    from fedrl_lightning.cli import FedRLCLI

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a run directory")
    config = yaml.safe_load(path.read_text())
    config.pop("ckpt_path", None)  # an argument of ``fit``, not of the classes
    config["seed_everything"] = False  # greedy evaluation needs no global seed (the classes seed themselves)

    class _ArgumentsOnly(FedRLCLI):
        build_trainer = False

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ArgumentsOnly(args=config, run=False)
    trainer = dict(vars(cli.trainer))
    return cli.model, cli.datamodule, trainer.get("rollout") or HFRollout(), trainer


def _load_adapter(module: Any, adapter_dir: Path) -> None:
    """Copy a saved PEFT adapter into the module's ``default`` adapter."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(module.model, load_peft_weights(str(adapter_dir), device="cpu"))
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir} does not fit the run's model: {result.unexpected_keys[:3]} unexpected")


def evaluate_run(
    run_dir: str | Path, split: str = "eval", batch_size: int | None = None
) -> dict[int, dict[str, float]]:
    """Every client's greedy accuracy and mean reward on its ``split`` under the run's final adapter (its own one,
    after local-only training), rebuilt from the run's ``config.yaml``.

    Args:
        run_dir: a finished run's ``output_dir``.
        split: ``eval`` (each client's held-out examples) or ``train``.
        batch_size: prompts per generation call; None = the run's ``eval_batch_size``.

    Returns:
        ``{client_id: {"accuracy": ..., "reward": ..., "n": ...}}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    adapters = adapter_dirs(run_dir)
    module, data, rollout, trainer = load_run(run_dir)
    batch_size = batch_size or int(trainer.get("eval_batch_size") or 32)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        module.to("cuda")
    data.prepare_data()
    data.setup("fit")
    module.setup_data(data)
    results: dict[int, dict[str, float]] = {}
    for cid in data.client_ids():
        adapter = adapters.get(None, adapters.get(cid))
        if adapter is None:  # a local-only client that never trained has no adapter of its own
            continue
        _load_adapter(module, adapter)
        examples = data.eval_examples(cid) if split == "eval" else data.train_examples(cid)
        results[cid] = {**evaluate(module, rollout, examples, batch_size), "n": float(len(examples))}
    return results


def format_results(results: dict[int, dict[str, float]], split: str = "eval") -> str:
    """A table: one row per client, then the mean over clients."""
    lines = [f"{'client':>6}  {'n':>5}  {split + ' accuracy':>14}  {'reward':>8}"]
    for cid, row in results.items():
        lines.append(
            f"{cid:>6}  {int(row['n']):>5}  {row.get('accuracy', float('nan')):>14.4f}  {row.get('reward', 0):>8.4f}"
        )
    if results:
        mean = sum(r.get("accuracy", float("nan")) for r in results.values()) / len(results)
        lines.append(f"{'mean':>6}  {'':>5}  {mean:>14.4f}")
    return "\n".join(lines)


def export_merged(run_dir: str | Path, output: str | Path, client: int | None = None, dtype: str = "float32") -> Path:
    """Merge the run's final adapter into its base and write a standalone checkpoint (weights + tokenizer).

    The base is loaded from the adapter's recorded ``base_model_name_or_path`` (a Hub id, a path, or
    ``embedded:...``), so the run's config is not needed.

    Args:
        run_dir: a finished run's ``output_dir``.
        output: the directory to write (``AutoModelForCausalLM.from_pretrained(output)`` loads it).
        client: after local-only training, whose adapter to export (required there); ignored otherwise.
        dtype: dtype of the merge and of the written weights (``float32``, ``bfloat16``, or ``auto``).
    """
    from peft import PeftModel

    adapters = adapter_dirs(run_dir)
    if None in adapters:
        adapter = adapters[None]
    elif client in adapters:
        adapter = adapters[client]
    else:
        raise ValueError(
            f"{run_dir} holds one adapter per client (local-only run): pass --client, one of {list(adapters)}"
        )
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty: choose another --output")
    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_base(name, dtype=dtype, attn_implementation=None)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.to(resolve_dtype(dtype)).save_pretrained(str(output), safe_serialization=True)
    load_tokenizer(name).save_pretrained(str(output))
    return output


def main(argv: list[str]) -> None:
    """``fedrl eval`` / ``fedrl export``: ``argv`` starts with the subcommand's name."""
    parser = argparse.ArgumentParser(prog="fedrl", description="Use a finished run's adapter(s).")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="print each client's held-out accuracy under the run's final adapter(s)")
    ev.add_argument("run_dir", help="the run's output_dir")
    ev.add_argument("--split", choices=SPLITS, default="eval", help="each client's held-out split (default) or train")
    ev.add_argument("--batch-size", type=int, default=None, help="prompts per generation call (default: the run's)")
    ex = sub.add_parser("export", help="write the base model with the run's adapter merged in")
    ex.add_argument("run_dir", help="the run's output_dir")
    ex.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    ex.add_argument("--client", type=int, default=None, help="a local-only run: whose adapter")
    ex.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    args = parser.parse_args(argv)
    if args.command == "eval":
        print(format_results(evaluate_run(args.run_dir, args.split, args.batch_size), args.split))
    else:
        out = export_merged(args.run_dir, args.output, args.client, args.dtype)
        print(f"merged model written to {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
