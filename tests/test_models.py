"""Model loading (attention, dtype, 4-bit, Hub ids offline), portable adapters, ``fedrl eval`` / ``fedrl export``,
and the CLI's federated defaults (FedAvg, one ``seed``)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedrl_lightning import checkpoint
from fedrl_lightning.cli import FedRLCLI, main
from fedrl_lightning.errors import EXIT_USAGE
from fedrl_lightning.export import evaluate_run, load_run
from fedrl_lightning.models import (
    EMBEDDED_NAME,
    TINY,
    load_base,
    load_causal_lm,
    load_tokenizer,
    portable_name,
    resolve_dtype,
    select_attn_implementation,
)

ROOT = Path(__file__).parent.parent
TINY_CONFIG = str(ROOT / "configs" / "tiny.yaml")


def test_attn_implementation_falls_back_to_sdpa_with_one_log_line(monkeypatch, caplog):
    import fedrl_lightning.models as models_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models_mod, "_ATTN_LOGGED", False)
    with caplog.at_level(logging.INFO, logger="fedrl_lightning.models"):
        assert select_attn_implementation("auto") == "sdpa"
        assert select_attn_implementation() == "sdpa"
    assert sum("using sdpa" in r.getMessage() for r in caplog.records) == 1
    assert select_attn_implementation("eager") == "eager" and select_attn_implementation(None) is None
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_attn_implementation("flash_attention_2")
    model, _ = load_causal_lm(TINY)  # the policy's default "auto" lands on sdpa here
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None, reason="needs CUDA + flash_attn"
)
def test_flash_attention_2_selected_and_loads_on_cuda():
    assert select_attn_implementation("auto") == "flash_attention_2"
    model, tokenizer = load_causal_lm(TINY, dtype="bfloat16")  # attn_implementation="auto", as PolicyModule
    model = model.cuda()
    assert model.config._attn_implementation == "flash_attention_2"
    ids = torch.randint(0, len(tokenizer), (2, 8), device="cuda")
    assert model(input_ids=ids).logits.shape == (2, 8, len(tokenizer))


# -- dtype, 4-bit, names --------------------------------------------------------------------------------------------


def test_dtype_auto_is_float32_without_cuda_and_4bit_needs_cuda_and_bitsandbytes(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float33"):
        resolve_dtype("float33")
    model_dir = tmp_path / "model"
    load_base(TINY).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="load_in_4bit.*CUDA"):
        load_causal_lm(str(model_dir), load_in_4bit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    with pytest.raises(ValueError, match=r"load_in_4bit.*bitsandbytes.*\[qlora\]"):
        load_causal_lm(str(model_dir), dtype="float32", load_in_4bit=True)
    with pytest.raises(ValueError, match="tiny-random"):
        load_causal_lm(TINY, dtype="float32", load_in_4bit=True)


def test_portable_names_and_the_built_in_specs(tmp_path, monkeypatch):
    assert portable_name("embedded") == portable_name(EMBEDDED_NAME) == "embedded:SmolLM2-135M-Instruct"
    assert portable_name(TINY) == TINY and portable_name(TINY, seed=3) == "tiny-random:3"
    assert portable_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert portable_name("mine") == str(tmp_path / "mine")
    seeded = {n: p for n, p in load_base("tiny-random:3").named_parameters()}
    assert all(torch.equal(p, seeded[n]) for n, p in load_causal_lm(TINY, seed=3)[0].named_parameters())
    assert len(load_tokenizer(EMBEDDED_NAME)) == len(load_tokenizer("embedded"))
    with pytest.raises(ValueError, match="embedded:SmolLM2-135M-Instruct"):
        load_causal_lm("embedded:Other-1B")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_hub_id_neither_cached_nor_reachable_exits_2_with_one_line_naming_it(tmp_path, offline):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if offline else "0"}
    # No Hub: a port nothing listens on refuses at once, on any machine (with or without network).
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    args = ["fit", "-c", TINY_CONFIG, "--trainer.output_dir", str(tmp_path / "run"), "--model.init_args.model", model]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fedrl_lightning.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedrl: error")]
    assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
    assert len(errors) == 1 and model in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("HF_HUB_OFFLINE" if offline else "unreachable") in errors[0]
    assert elapsed < 60, f"{elapsed:.0f} s: retried the Hub"


def test_one_request_decides_between_the_hub_and_the_cache(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    import fedrl_lightning.models as models_mod

    def head(outcome):
        def fake(*args, **kwargs):
            calls.append(kwargs)
            if outcome is not None:
                raise outcome

        return fake

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response
    Exception.__init__(not_found, "404")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models_mod.hub_constants, "HF_HUB_OFFLINE", False)
    for outcome, cached, expected in [
        (None, False, False),  # the Hub answers: download (or update) as usual
        (ConnectionError("down"), True, True),  # unreachable but cached: the cache
        (ConnectionError("down"), False, "unreachable"),
        (not_found, False, "not on the Hugging Face Hub"),
    ]:
        calls = []
        monkeypatch.setattr(models_mod, "get_hf_file_metadata", head(outcome))
        monkeypatch.setattr(models_mod, "_cached", lambda repo_id, cached=cached: cached)
        if isinstance(expected, str):
            with pytest.raises(FileNotFoundError, match=f"'org/model'.*{expected}"):
                models_mod._hub_local_only("org/model")
        else:
            assert models_mod._hub_local_only("org/model") is expected
        assert len(calls) == 1  # one request, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(models_mod, "_cached", lambda repo_id: True)
    assert models_mod._hub_local_only("org/model") is True and calls == []


# -- a finished run: the portable adapter, fedrl eval, fedrl export -------------------------------------------------


def fit(out: Path, *extra: str) -> None:
    main(["fit", "-c", TINY_CONFIG, "--trainer.output_dir", str(out), "--trainer.num_rounds", "1", *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # A reward that varies within a group even for a random model, so the adapter moves from its zero start.
    reward = ["--model.init_args.reward_funcs", "[conftest.length_reward]", "--model.init_args.reward_weights=[1]"]
    fit(out, *reward, "--model.init_args.learning_rate", "1e-2")
    return out


def test_the_adapter_loads_on_the_base_named_in_its_config(run_dir):
    name = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == TINY
    peft_model = PeftModel.from_pretrained(load_base(name), run_dir / "adapter").eval()
    module = load_run(run_dir)[0]
    module.load_trainable_state(
        checkpoint.load(checkpoint.latest_valid(run_dir / "checkpoints"))["server"]["global_state"]
    )
    ids = torch.randint(0, len(module.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits
        with module.model.disable_adapter():
            assert not torch.allclose(expected, module.model(input_ids=ids).logits)  # the adapter trained
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)


@pytest.mark.slow
def test_an_embedded_models_adapter_records_embedded_and_loads_with_peft(tmp_path):
    from fedrl_lightning.modules import GRPOModule

    module = GRPOModule(model="embedded", lora_r=2, dtype="float32").eval()
    state = {k: 0.01 * torch.randn_like(v) for k, v in module.trainable_state().items()}
    module.save_adapter(tmp_path, state)
    name = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == "embedded:SmolLM2-135M-Instruct"
    peft_model = PeftModel.from_pretrained(load_base(name, dtype="float32"), tmp_path).eval()
    module.load_trainable_state(state)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-4)


def test_fedrl_eval_prints_the_runs_own_final_accuracy_per_client(run_dir, capsys):
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    final = {k: float(v) for row in rows for k, v in row.items() if v and k.endswith("/eval/accuracy")}
    results = evaluate_run(run_dir)
    assert {f"client{cid}/eval/accuracy": r["accuracy"] for cid, r in results.items()} == final
    assert all(r["n"] == 2 for r in results.values())
    main(["eval", str(run_dir), "--batch-size", "1"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["client", "n", "eval"] and len(table) == 2 + len(results)
    assert set(evaluate_run(run_dir, split="train")) == set(results)


def test_fedrl_export_writes_a_merged_model_that_transformers_loads(run_dir, tmp_path):
    out = tmp_path / "merged"
    main(["export", str(run_dir), "--output", str(out)])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "tokenizer_config.json").is_file()
    peft_model = PeftModel.from_pretrained(load_base(TINY), run_dir / "adapter").eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)


def test_eval_and_export_of_what_is_not_a_run_exit_2_naming_it(tmp_path, capsys):
    for args in (["eval", str(tmp_path)], ["export", str(tmp_path), "--output", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == EXIT_USAGE
        err = capsys.readouterr().err
        assert str(tmp_path) in err and "no final adapter" in err and "Traceback" not in err


# -- CLI defaults: FedAvg, one seed ----------------------------------------------------------------------------------


class _Parsed(Exception):
    pass


class _ParseOnly(FedRLCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config["fit"])


def parsed(*args: str):
    with pytest.raises(_Parsed) as info:
        _ParseOnly(args=["fit", "-c", TINY_CONFIG, *args])
    return info.value.args[0]


def test_aggregation_defaults_to_fedavg_and_null_is_local_only(tmp_path):
    no_aggregation = tmp_path / "plain.yaml"
    config = yaml.safe_load(Path(TINY_CONFIG).read_text())
    del config["trainer"]["aggregation"]
    no_aggregation.write_text(yaml.safe_dump(config))
    with pytest.raises(_Parsed) as info:
        _ParseOnly(args=["fit", "-c", str(no_aggregation)])
    assert info.value.args[0]["trainer.aggregation"].class_path == "fedrl_lightning.aggregation.FedAvg"
    assert parsed("--trainer.aggregation", "null")["trainer.aggregation"] is None
    assert parsed()["trainer.accelerator"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_one_seed_fills_the_others_unless_they_are_given(tmp_path):
    keys = ("trainer.seed", "model.init_args.seed", "data.init_args.seed", "seed_everything")
    assert [parsed("--seed", "3")[k] for k in keys] == [3, 3, 3, 3]
    config = parsed("--seed", "3", "--model.init_args.seed", "5", "--seed_everything", "7")
    assert [config[k] for k in keys] == [3, 5, 3, 7] and "seed" not in config
    in_yaml = tmp_path / "seed.yaml"
    in_yaml.write_text("seed: 4\ntrainer:\n  seed: 1\n")
    assert [parsed("-c", str(in_yaml))[k] for k in keys] == [1, 4, 4, 4]
    assert [parsed()[k] for k in keys] == [0, 0, 0, False]


def test_a_seeded_local_only_run_records_its_seeds_and_exports_per_client(tmp_path, capsys):
    out = tmp_path / "run"
    fit(out, "--trainer.aggregation", "null", "--seed", "3")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["trainer"]["aggregation"] is None and "seed" not in config
    assert (config["trainer"]["seed"], config["model"]["init_args"]["seed"], config["data"]["init_args"]["seed"]) == (
        3,
        3,
        3,
    )
    adapter = json.loads((out / "adapters" / "client0" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random:3"
    assert sorted(evaluate_run(out)) == [0, 1]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(out), "--output", str(tmp_path / "merged")])
    assert exit_info.value.code == EXIT_USAGE and "--client" in capsys.readouterr().err
    main(["export", str(out), "--output", str(tmp_path / "merged"), "--client", "1"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_hidden_layers == 2
