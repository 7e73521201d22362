"""The CPU side of README's "On a GPU": its command's config parses as written, and trains on CPU with the GPU-only
settings overridden (tiny model, float32, HF generate in place of the colocated vLLM engine)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from fedrl_lightning.cli import FedRLCLI

ROOT = Path(__file__).parent.parent


def readme_gpu_command() -> list[str]:
    """The ``fedrl fit`` line of README's "On a GPU" section, as arguments after ``fedrl``."""
    section = (ROOT / "README.md").read_text().split("## On a GPU", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in re.findall(r"^.*fedrl fit .*$", section, re.M))
    return shlex.split(line)[1:]


def test_the_gpu_config_is_bf16_cuda_with_a_colocated_vllm_engine():
    args = readme_gpu_command()
    assert args[:2] == ["fit", "-c"]
    config = yaml.safe_load((ROOT / args[2]).read_text())
    assert config["trainer"]["accelerator"] == "cuda" and config["trainer"]["precision"] == "bf16-mixed"
    assert config["model"]["init_args"]["dtype"] == "bfloat16"
    assert config["trainer"]["rollout"]["class_path"] == "fedrl_lightning.rollout.vllm.VLLMRollout"
    assert config["trainer"]["rollout"]["init_args"]["dtype"] == "bfloat16"


def test_the_readme_gpu_command_trains_on_cpu_with_cpu_overrides(tmp_path):
    out = tmp_path / "run"
    cpu = [
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.rollout=fedrl_lightning.rollout.hf.HFRollout",
        "--trainer.num_rounds=1",
        "--trainer.local_steps=1",
        "--trainer.eval_batch_size=4",
        f"--trainer.output_dir={out}",
        "--model.init_args.model=tiny-random",
        "--model.init_args.dtype=float32",
        "--model.init_args.lora_r=4",
        "--model.init_args.num_generations=2",
        "--model.init_args.prompts_per_step=2",
        "--model.init_args.micro_batch_size=4",
        "--model.init_args.max_completion_length=4",
        "--data.init_args.train_size=4",
        "--data.init_args.eval_size=2",
    ]
    FedRLCLI(args=readme_gpu_command() + cpu)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr_scheduler_type"] == "constant_with_warmup"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) >= 2
