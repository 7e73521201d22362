"""The federated loop on the tiny model: state swap, aggregation, outputs, resume."""

import copy
import csv

import torch
from transformers import AutoModelForCausalLM

from conftest import make_data, make_module
from fedrl_lightning.aggregation import FedAvg, weighted_average
from fedrl_lightning.callbacks import HOOKS, Callback
from fedrl_lightning.trainer import FederatedTrainer


class Recorder(Callback):
    def __init__(self):
        self.calls = []
        self.updates = None

    def __getattribute__(self, name):
        if name in HOOKS:
            self_ = object.__getattribute__(self, "__dict__")
            self_["calls"].append(name)
        return object.__getattribute__(self, name)

    def on_before_aggregate(self, updates):
        self.updates = [copy.deepcopy(u) for u in updates]


def _trainer(tmp_path, **kw):
    args = dict(num_rounds=2, aggregation=FedAvg(), output_dir=str(tmp_path), progress=False, eval_batch_size=4)
    args.update(kw)
    return FederatedTrainer(**args)


def test_fit_runs_hooks_in_order_aggregates_by_fedavg_and_writes_outputs(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, num_rounds=1, callbacks=[recorder], eval_before_training=False)
    trainer.fit(make_module(), make_data())
    client = ["on_client_start", "on_local_step_end"]
    assert recorder.calls == [
        "on_fit_start",
        "on_round_start",
        "on_clients_selected",
        *client,
        *client,
        "on_client_end",
        "on_client_end",
        "on_before_aggregate",
        "on_after_aggregate",
        "on_evaluate_end",
        "on_round_end",
        "on_fit_end",
    ]
    assert set(recorder.calls) == set(HOOKS)
    # the global adapter is exactly the prompt-weighted mean of what the clients sent up
    expected = weighted_average([u.state for u in recorder.updates], [u.num_samples for u in recorder.updates])
    assert all(torch.equal(trainer.global_state[k], v) for k, v in expected.items())
    for name in ("metrics.csv", "curves.png", "checkpoints/round-000001/state.pt", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert trainer.comm.totals(1)["up"] > 0 and trainer.comm.totals(1)["down"] > 0
    row = trainer.history[-1]
    assert {"client0/reward", "client1/eval/accuracy", "eval/accuracy_mean", "comm/bytes_up"} <= row.keys()
    # the federated overhead (swap, channel, aggregation) is a measured share of the round's training time
    assert 0 < row["timing/aggregation"] < row["timing/round_train"]
    assert 0 < row["timing/federated_overhead"] < 1


def test_state_swap_leaves_other_clients_state_untouched(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1, aggregation=None)
    trainer.fit(make_module(), make_data())
    a_before = copy.deepcopy(trainer.client_states[0])
    b_adapter_before = copy.deepcopy(trainer.client_states[1].adapter)
    trainer.client_round(2, 1)  # client B trains another round on the shared resident model
    a_after = trainer.client_states[0]
    assert all(torch.equal(a_after.adapter[k], v) for k, v in a_before.adapter.items())
    assert torch.equal(a_after.rng, a_before.rng) and a_after.sampler == a_before.sampler
    assert a_before.optimizer.keys() == a_after.optimizer.keys() and len(a_before.optimizer) > 0
    for key, value in a_before.optimizer.items():  # "<param index>.exp_avg", ...
        assert torch.equal(a_after.optimizer[key], value)
    assert any(not torch.equal(trainer.client_states[1].adapter[k], v) for k, v in b_adapter_before.items())
    # swapping A back in reproduces its adapter bit for bit
    trainer.module.load_trainable_state(a_after.adapter)
    assert all(torch.equal(v, a_before.adapter[k]) for k, v in trainer.module.trainable_state().items())


def test_local_only_keeps_adapters_private_and_sends_nothing(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1, aggregation=None)
    trainer.fit(make_module(), make_data())
    assert trainer.comm.totals() == {"down": 0, "up": 0}
    assert (tmp_path / "adapters" / "client0" / "adapter_model.safetensors").is_file()


def test_single_client_is_centralized_grpo(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1)
    trainer.fit(make_module(), make_data(num_clients=1, tasks=["basic_arithmetic"]))
    assert trainer.data.client_ids() == [0] and "client0/reward" in trainer.history[-1]


def test_resume_continues_to_the_same_global_adapter(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit(make_module(), make_data())
    part = _trainer(tmp_path / "part", num_rounds=1)
    part.fit(make_module(), make_data())
    resumed = _trainer(tmp_path / "part", num_rounds=2)
    resumed.fit(make_module(), make_data())
    assert resumed.round_idx == 2 and [h["round"] for h in resumed.history] == [0, 1, 2]
    assert all(torch.equal(resumed.global_state[k], v) for k, v in full.global_state.items())
    # metrics.csv keeps the rounds from before the restart (round rows: those without a client)
    with open(tmp_path / "part" / "metrics.csv") as f:
        rounds = [int(row["round"]) for row in csv.DictReader(f) if not row["client"]]
    assert rounds == [0, 1, 2]


def test_merged_export_matches_the_adapted_policy(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1, save_merged=True, eval_before_training=False)
    module = make_module()
    trainer.fit(module, make_data())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    module.load_trainable_state(trainer.global_state)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_dp_fedavg_logs_epsilon_and_a_spent_budget_stops_cleanly(tmp_path):
    from fedrl_lightning.privacy import DPFedAvg

    dp = DPFedAvg(num_clients=2, noise_multiplier=1.0, clip_norm=0.05, delta=1e-3)
    trainer = _trainer(tmp_path / "dp", num_rounds=1, aggregation=dp, eval_before_training=False)
    trainer.fit(make_module(), make_data())
    assert trainer.history[-1]["dp/epsilon"] > 0 and trainer.stopped is None
    # A target below one round's epsilon: the round is not released, the run stops with its last checkpoint.
    tight = DPFedAvg(num_clients=2, noise_multiplier=1.0, clip_norm=0.05, delta=1e-3, target_epsilon=1e-3)
    stopped = _trainer(tmp_path / "tight", num_rounds=2, aggregation=tight, eval_before_training=False)
    stopped.fit(make_module(), make_data())
    assert stopped.round_idx == 0 and "target_epsilon" in stopped.stopped
    assert not list(stopped.checkpoint_dir.glob("round-*"))
