"""Exact resume after SIGKILL, torn checkpoints, client faults."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import make_data, make_module
from fedrl_lightning import checkpoint
from fedrl_lightning.aggregation import FedAvg
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.client_state import ClientStateBank
from fedrl_lightning.trainer import FederatedTrainer

ROOT = Path(__file__).parent.parent

RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import make_data, make_module
    from fedrl_lightning.aggregation import FedAvg
    from fedrl_lightning.callbacks import Callback
    from fedrl_lightning.trainer import FederatedTrainer

    class KillMidRound(Callback):
        # SIGKILL: no cleanup, no exception handler, like the OOM killer or a pulled plug.
        def on_client_end(self, round_idx, client_id):
            if round_idx == {kill_round} and client_id == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = FederatedTrainer(num_rounds=3, aggregation=FedAvg(), output_dir={out!r}, progress=False,
                               eval_batch_size=4, callbacks=[KillMidRound()], client_state_dir={state_dir!r})
    trainer.fit(make_module(), make_data())
    torch.save({{"global": trainer.global_state, "history": trainer.history}}, {out!r} + "/final.pt")
    """
)


def _run(out: Path, kill_round: int, on_disk: bool = False) -> subprocess.CompletedProcess:
    state_dir = str(out / "client_states") if on_disk else None
    script = RUN.format(tests=str(ROOT / "tests"), kill_round=kill_round, out=str(out), state_dir=state_dir)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _comparable(history):
    # Wall-clock timings differ between any two runs; everything else must match exactly.
    return [{k: v for k, v in row.items() if "timing/" not in k} for row in history]


@pytest.mark.parametrize("on_disk", [False, True], ids=["ram-bank", "disk-bank"])
def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(tmp_path, on_disk):
    """With the disk bank, the killed round has already rewritten client 0's row: the undo journal restores it."""
    straight = _run(tmp_path / "straight", kill_round=-1, on_disk=on_disk)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run(tmp_path / "killed", kill_round=2, on_disk=on_disk)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.latest_valid(tmp_path / "killed" / "checkpoints").name == "round-000001"
    if on_disk:
        assert (tmp_path / "killed" / "client_states" / "undo-000002.log").stat().st_size > 0
    resumed = _run(tmp_path / "killed", kill_round=-1, on_disk=on_disk)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=False)
    assert a["global"].keys() == b["global"].keys()
    assert all(torch.equal(a["global"][k], b["global"][k]) for k in a["global"])  # bitwise
    assert _comparable(a["history"]) == _comparable(b["history"])


def _fabric():
    from lightning.fabric import Fabric

    return Fabric(accelerator="cpu", devices=1)


def test_torn_checkpoint_falls_back_to_the_previous_round(tmp_path):
    fabric = _fabric()
    for r in (1, 2):
        checkpoint.save(tmp_path, r, fabric, {"round": r})
    (tmp_path / "round-000002" / "state.pt").write_bytes(b"truncated")
    assert checkpoint.latest_valid(tmp_path).name == "round-000001"
    (tmp_path / "round-000001" / "manifest.json").unlink()
    assert checkpoint.latest_valid(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "round-000002"), tmp_path)


def test_save_prunes_only_the_checkpoints_it_is_given(tmp_path):
    fabric = _fabric()
    for r in range(1, 5):
        prune = [checkpoint.round_path(tmp_path, r - 2)] if r > 2 else []
        checkpoint.save(tmp_path, r, fabric, {"round": r}, prune, meta={"settings": {"a": 1}})
    (tmp_path / "round-000009").mkdir()  # not given: never touched
    checkpoint.save(tmp_path, 5, fabric, {"round": 5}, [checkpoint.round_path(tmp_path, 3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004", "round-000005", "round-000009"]
    manifest = json.loads((tmp_path / "round-000004" / "manifest.json").read_text())
    assert manifest["round"] == 4 and manifest["settings"] == {"a": 1}


class Sabotage(Callback):
    """Makes one client fail in a chosen way."""

    def __init__(self, client_id, how):
        self.client_id, self.how = client_id, how

    def on_client_start(self, client_id):
        if client_id == self.client_id and self.how == "raise":
            raise RuntimeError("disk full on the client")

    def on_local_step_end(self, client_id, module):
        if client_id != self.client_id:
            return
        with torch.no_grad():
            param = next(p for p in module.model.parameters() if p.requires_grad)
            if self.how == "nan":
                param.fill_(float("nan"))
            elif self.how == "explode":
                param.mul_(1e6).add_(1e3)


@pytest.mark.parametrize(
    "how, message",
    [("raise", "disk full"), ("nan", "non-finite"), ("explode", "exceeds max_update_norm")],
)
def test_faulty_client_is_dropped_with_reason_and_metric(tmp_path, how, message, caplog):
    trainer = FederatedTrainer(
        num_rounds=1,
        aggregation=FedAvg(),
        output_dir=str(tmp_path),
        progress=False,
        eval_before_training=False,
        callbacks=[Sabotage(1, how)],
        max_update_norm=100.0,
        eval_batch_size=4,
    )
    trainer.fit(make_module(), make_data())
    row = trainer.history[-1]
    assert row["faults/client1"] == 1.0 and row["faults/dropped"] == 1.0 and "faults/client0" not in row
    assert message in caplog.text
    assert all(torch.isfinite(v).all() for v in trainer.global_state.values())
    assert trainer.round_idx == 1 and trainer.stopped is None


def test_timeouts_below_min_clients_retry_then_stop_with_a_valid_checkpoint(tmp_path, caplog):
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=FedAvg(),
        output_dir=str(tmp_path),
        progress=False,
        eval_before_training=False,
        eval_batch_size=4,
    )
    trainer.fit(make_module(), make_data(), ckpt_path=None)
    assert trainer.round_idx == 2
    later = FederatedTrainer(
        num_rounds=3,
        aggregation=FedAvg(),
        output_dir=str(tmp_path),
        progress=False,
        client_timeout=1e-6,
        min_clients=2,
        round_retries=2,
        eval_batch_size=4,
    )
    later.fit(make_module(), make_data())
    assert later.round_idx == 2 and "failed 3 time(s)" in later.stopped and "min_clients=2" in later.stopped
    assert "timed out after" in caplog.text and "client_timeout=1e-06" in caplog.text
    assert checkpoint.latest_valid(tmp_path / "checkpoints").name == "round-000002"
    assert all(torch.equal(later.global_state[k], v) for k, v in trainer.global_state.items())


class BlockAddresses(Callback):
    """Where client 0's stored optimizer state lives after each round."""

    def __init__(self):
        self.addresses = []

    def on_round_end(self, trainer):
        state = trainer.client_states[0].optimizer
        self.addresses.append(state["0.exp_avg"].data_ptr())


@pytest.mark.parametrize(
    ("elsewhere", "on_disk"),
    [(False, False), (True, False), (False, True)],
    ids=["resumed-in-place", "resumed-from-another-run", "disk-bank"],
)
def test_a_retried_round_restores_the_clients_that_trained_from_the_checkpoint(tmp_path, elsewhere, on_disk):
    """A client's state is rewritten in place (its row of the bank), so a retry must reload the round's start: from
    this run's last checkpoint, or from the one it resumed from (the disk bank: from its undo journal)."""
    blocks = BlockAddresses()
    common = dict(aggregation=None, output_dir=str(tmp_path), progress=False, eval_every=0, eval_batch_size=4)
    if on_disk:
        common["client_state_dir"] = str(tmp_path / "client_states")
    first = FederatedTrainer(num_rounds=2, eval_before_training=False, callbacks=[blocks], **common)
    first.fit(make_module(), make_data(), ckpt_path=None)
    if on_disk:  # the checkpoint references the bank's files: round 2's end state is what they hold now
        start = first.client_states[0]  # (reads of a disk bank are copies)
    else:
        assert blocks.addresses[0] == blocks.addresses[1]  # round 2 rewrote round 1's row: no second copy
        saved = ClientStateBank([0, 1])
        saved.load_state_dict(checkpoint.load(checkpoint.round_path(tmp_path / "checkpoints", 2))["clients"])
        start = saved.get(0)
    resume = "last"
    if elsewhere:
        common["output_dir"], resume = str(tmp_path / "other"), str(checkpoint.round_path(tmp_path / "checkpoints", 2))
    later = FederatedTrainer(num_rounds=3, min_clients=2, round_retries=1, callbacks=[Sabotage(1, "raise")], **common)
    later.fit(make_module(), make_data(), ckpt_path=resume)
    assert later.round_idx == 2 and "failed 2 time(s)" in later.stopped
    restored = later.client_states[0]  # client 0 trained in both attempts; it is back at round 2's end state
    assert all(torch.equal(restored.adapter[k], v) for k, v in start.adapter.items())
    assert restored.optimizer.keys() == start.optimizer.keys()
    assert all(torch.equal(v, start.optimizer[k]) for k, v in restored.optimizer.items())
    assert torch.equal(restored.rng, start.rng) and restored.sampler == start.sampler


def test_missing_model_path_and_unknown_hub_id_fail_fast_with_the_name(tmp_path, monkeypatch):
    from fedrl_lightning.models import load_causal_lm

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time: no request, and the id is in no cache
    with pytest.raises(FileNotFoundError, match="someorg/somemodel.*HF_HUB_OFFLINE"):
        load_causal_lm("someorg/somemodel")


def test_prompts_as_messages_without_a_chat_template_name_the_problem():
    from fedrl_lightning.rollout.hf import HFRollout

    module = make_module()
    module.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        HFRollout().generate(module, [[{"role": "user", "content": "hi"}]], module.sampling)
    rollout = HFRollout().generate(module, ["plain prompt"], module.sampling)
    assert len(rollout) == module.num_generations


def test_mistyped_config_key_and_bad_data_file_are_named(tmp_path, capsys):
    from fedrl_lightning.cli import FedRLCLI

    with pytest.raises(SystemExit):
        FedRLCLI(args=["fit", "-c", "configs/tiny.yaml", "--model.init_args.lora_rank", "4"])
    assert "lora_rank" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "answer": "2"}\n{"question": "no prompt column", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2.*prompt"):
        make_data(data_files=[str(bad)], num_clients=1, partition="iid").setup("fit")


def test_ckpt_path_last_through_the_cli_resumes(tmp_path):
    from fedrl_lightning.cli import FedRLCLI

    out = str(tmp_path / "run")
    FedRLCLI(args=["fit", "-c", "configs/tiny.yaml", "--trainer.output_dir", out, "--trainer.num_rounds", "1"])
    FedRLCLI(
        args=[
            "fit",
            "-c",
            "configs/tiny.yaml",
            "--trainer.output_dir",
            out,
            "--trainer.num_rounds",
            "2",
            "--ckpt_path",
            "last",
        ]
    )
    assert checkpoint.latest_valid(tmp_path / "run" / "checkpoints").name == "round-000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        FedRLCLI(args=["fit", "-c", "configs/tiny.yaml", "--trainer.output_dir", out, "--ckpt_path", out])


class FailAfterFirstStep(Callback):
    """Client 1 fails in round 2 after one optimizer step has updated its optimizer state."""

    def on_local_step_end(self, round_idx, client_id, step):
        if round_idx == 2 and client_id == 1 and step == 0:
            raise RuntimeError("client crashed mid-round")


def test_a_client_failing_mid_round_keeps_its_state_from_before_the_round(tmp_path):
    before = {}

    class Keep(Callback):
        def on_round_end(self, trainer, round_idx):
            if round_idx == 1:
                before.update({k: v.clone() for k, v in trainer.client_states[1].optimizer.items()})

    trainer = FederatedTrainer(
        num_rounds=2,
        local_steps=2,
        aggregation=FedAvg(),
        output_dir=str(tmp_path),
        progress=False,
        eval_every=0,
        eval_before_training=False,
        callbacks=[FailAfterFirstStep(), Keep()],
        eval_batch_size=4,
    )
    trainer.fit(make_module(), make_data())
    assert trainer.history[-1]["faults/client1"] == 1.0
    after = trainer.client_states[1].optimizer
    # the live optimizer stepped once in round 2, the stored state did not move
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


class KeepUpdates(Callback):
    """Keeps client 0's first update as it came, a clone of it, and a copy of its values to compare with later."""

    def __init__(self):
        self.kept = self.cloned = self.copy = None

    def on_client_end(self, client_id, update):
        if client_id == 0 and self.kept is None:
            self.kept, self.cloned = update.state, {k: v.clone() for k, v in update.state.items()}
            self.copy = {k: v.clone() for k, v in update.state.items()}


def test_a_local_only_update_is_the_stored_adapter_itself_until_the_next_round(tmp_path):
    """No second copy of a local-only client's adapter is held until the round ends: the update views the client's
    row of the bank, which its next round rewrites in place; a clone keeps it."""
    keep, blocks = KeepUpdates(), BlockAddresses()
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=None,
        output_dir=str(tmp_path),
        progress=False,
        eval_every=0,
        eval_before_training=False,
        callbacks=[keep, blocks],
    )
    trainer.fit(make_module(), make_data(), ckpt_path=None)
    assert blocks.addresses[0] == blocks.addresses[1]  # round 2 rewrote the client's row in place
    stored = trainer.client_states[0].adapter
    assert all(keep.kept[k].data_ptr() == stored[k].data_ptr() for k in stored)  # views, not a copy
    assert all(torch.equal(keep.kept[k], v) for k, v in stored.items())  # so it now shows round 2's adapter
    assert all(torch.equal(keep.cloned[k], v) for k, v in keep.copy.items())  # the clone kept round 1's
    assert not all(torch.equal(stored[k], v) for k, v in keep.copy.items())  # and round 2 did train
