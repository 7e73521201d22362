"""Every config parses; the tiny config runs end to end through the CLI."""

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from fedrl_lightning import checkpoint
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.models import load_causal_lm

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        FedRLCLI(args=["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"trainer", "model", "data"} <= printed.keys()


def test_tiny_cli_run_writes_metrics_plot_and_loadable_adapter(tmp_path):
    out = tmp_path / "run"
    FedRLCLI(args=["fit", "-c", "configs/tiny.yaml", "--trainer.output_dir", str(out), "--trainer.num_rounds", "2"])
    for name in ("config.yaml", "metrics.csv", "curves.png", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "client0/reward" in header and "eval/accuracy_mean" in header
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["num_rounds"] == 2
    base, _ = load_causal_lm("tiny-random")
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    ckpt = checkpoint.load(checkpoint.latest_valid(out / "checkpoints"))["server"]
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded.keys() == ckpt["global_state"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in ckpt["global_state"].items())


def test_bad_override_names_the_key(capsys):
    with pytest.raises(SystemExit):
        FedRLCLI(args=["fit", "-c", "configs/tiny.yaml", "--trainer.num_roundz", "2"])
    assert "num_roundz" in capsys.readouterr().err
