"""The client side of the federated algorithms: FedProx's pull, SCAFFOLD's control variates, FedMOA's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import length_reward, make_data, make_module
from fedrl_lightning.aggregation import FedAvg, FedProx, Scaffold, TaskAwareFedAvg, proximal_term
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.modules.fedmoa import (
    FedMOAModule,
    initial_logits,
    logits_step,
    objective_hypergradient,
    simplex_weights,
)
from fedrl_lightning.rewards import answer_tag_reward
from fedrl_lightning.trainer import FederatedTrainer

ALGORITHMS = sorted(Path("configs/algorithms").glob("*.yaml"))
# Stateful algorithms run two rounds (their state is used in round 2); Krum needs n > 2f + 2 clients.
CLI_OVERRIDES = {
    "scaffold": ["--trainer.num_rounds", "2"],
    "fgrpo": ["--trainer.num_rounds", "2"],
    "fedmoa": ["--trainer.num_rounds", "2"],
    "fedadam": ["--trainer.num_rounds", "2"],
    "krum": ["--data.num_clients", "3"],
}


def _params(*values: list[float]) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.tensor(v, requires_grad=True) for i, v in enumerate(values)}


# -- FedProx ---------------------------------------------------------------------------------------------------


def test_fedprox_gradient_equals_the_gradient_of_the_proximal_term():
    params = _params([1.0, -2.0], [0.5])
    anchor = {"w0": torch.tensor([0.0, 1.0]), "w1": torch.tensor([2.0])}
    for p in params.values():
        p.grad = torch.full_like(p, 0.25)  # the task loss's gradient
    FedProx(mu=0.1).local_objective(anchor, {}).on_gradients(params, lr=1e-3)
    expected = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    term = proximal_term(expected, anchor, 0.1)
    term.backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, 0.25 + expected[k].grad)
    # by hand: w0 -> 0.25 + 0.1 * ([1, -2] - [0, 1]) = [0.35, -0.05]
    torch.testing.assert_close(params["w0"].grad, torch.tensor([0.35, -0.05]))
    assert FedProx(mu=0.0).local_objective(anchor, {}) is None and FedAvg().local_objective(anchor, {}) is None


# -- SCAFFOLD ----------------------------------------------------------------------------------------------------


def test_scaffold_client_corrects_gradients_and_computes_its_new_control_variate_by_hand():
    x = {"w0": torch.tensor([1.0, 1.0])}
    server = Scaffold()
    server.c = {"w0": torch.tensor([0.5, -0.5], dtype=torch.float64)}
    extra = {"scaffold_c": {"w0": torch.tensor([0.1, 0.2])}}
    objective = server.local_objective(x, extra)
    torch.testing.assert_close(objective.down["w0"], torch.tensor([0.5, -0.5]))
    params = {"w0": torch.tensor([1.0, 1.0], requires_grad=True)}
    for step in range(2):  # two steps at lr 0.1; g = 1 each time
        params["w0"].grad = torch.ones(2)
        objective.on_gradients(params, lr=0.1)
        # g + c - c_i = 1 + [0.5, -0.5] - [0.1, 0.2]
        torch.testing.assert_close(params["w0"].grad, torch.tensor([1.4, 0.3]))
        with torch.no_grad():
            params["w0"] -= 0.1 * params["w0"].grad
    sent = objective.finish(params)
    y = params["w0"].detach()  # 1 - 2 * 0.1 * [1.4, 0.3] = [0.72, 0.94]
    new_c = torch.tensor([0.1, 0.2]) - torch.tensor([0.5, -0.5]) + (torch.tensor([1.0, 1.0]) - y) / (2 * 0.1)
    torch.testing.assert_close(extra["scaffold_c"]["w0"].float(), new_c)  # option II: c_i - c + (x - y)/(K lr)
    # the corrections cancel out: c_i+ is the true mean gradient, 1
    torch.testing.assert_close(new_c, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(sent["scaffold_delta_c"]["w0"].float(), new_c - torch.tensor([0.1, 0.2]))


def test_scaffold_federated_run_server_c_is_the_mean_of_client_control_variates(tmp_path):
    server = Scaffold()
    trainer = FederatedTrainer(num_rounds=1, aggregation=server, output_dir=str(tmp_path), progress=False)
    trainer.fit(make_module(), make_data())
    cs = [trainer.client_states[cid].extra["scaffold_c"] for cid in (0, 1)]
    assert set(server.c) == set(trainer.global_state)
    for key, c in server.c.items():  # c starts at 0 and both clients report: c = mean(c_i+)
        torch.testing.assert_close(c, (cs[0][key].double() + cs[1][key].double()) / 2)
        if "lora_B" in key:  # one step from B = 0 moves only B (A's gradient is B^T(...) = 0)
            assert c.abs().sum() > 0, key
    fedavg = FederatedTrainer(num_rounds=1, aggregation=FedAvg(), output_dir=str(tmp_path / "f"), progress=False)
    fedavg.fit(make_module(), make_data())
    # c comes down and delta c goes up: each direction carries twice FedAvg's bytes (plus headers)
    for direction in ("down", "up"):
        ratio = trainer.comm.totals(1)[direction] / fedavg.comm.totals(1)[direction]
        assert 1.9 < ratio < 2.1, (direction, ratio)


def test_fedprox_run_pulls_clients_toward_the_global_adapter(tmp_path):
    class Spy:
        def on_client_end(self, update):
            self.update = update

    def drift(mu: float) -> float:
        spy = Spy()
        trainer = FederatedTrainer(
            num_rounds=1,
            local_steps=3,
            aggregation=FedProx(mu=mu),
            callbacks=[spy],
            output_dir=str(tmp_path / str(mu)),
            progress=False,
        )
        trainer.fit(make_module(learning_rate=1e-2), make_data(num_clients=1, tasks=["basic_arithmetic"]))
        start = trainer.client.initial_adapter
        return sum(float((spy.update.state[k] - v).norm()) for k, v in start.items())

    assert drift(50.0) < 0.8 * drift(0.0)


# -- FedMOA ----------------------------------------------------------------------------------------------------


def test_fedmoa_hypergradient_on_a_quadratic_matches_autograd_through_the_step():
    # L_k(θ) = 0.5 ||θ - c_k||²; θ_s = θ_{s-1} - η Σ λ_k ∇L_k(θ_{s-1}); meta-objective L_0(θ_s)
    centers = [torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, 3.0, 0.5], dtype=torch.float64)]
    theta0, lr = torch.tensor([0.2, -0.4, 1.0], dtype=torch.float64), 0.3
    lam = torch.tensor([0.6, 0.4], dtype=torch.float64, requires_grad=True)
    grads0 = [theta0 - c for c in centers]
    theta1 = theta0 - lr * (lam[0] * grads0[0] + lam[1] * grads0[1])
    meta = 0.5 * (theta1 - centers[0]).pow(2).sum()
    (expected,) = torch.autograd.grad(meta, lam)
    now = [(theta1 - centers[0]).detach()]
    h = objective_hypergradient(now, [[g] for g in grads0], lr, normalize=False)
    torch.testing.assert_close(h, expected)
    # the cosine variant keeps each entry's sign
    assert torch.equal(torch.sign(objective_hypergradient(now, [[g] for g in grads0], lr, True)), torch.sign(h))


def test_fedmoa_logit_step_is_gradient_descent_through_the_floored_softmax():
    logits, floor = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), 0.05
    h = torch.tensor([-0.5, 0.2, 0.0], dtype=torch.float64)
    phi = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((simplex_weights(phi, floor) * h).sum(), phi)
    torch.testing.assert_close(logits_step(logits, h, 0.7, floor), logits - 0.7 * grad)
    weights = simplex_weights(logits_step(logits, h, 0.7, floor), floor)
    assert abs(float(weights.sum()) - 1) < 1e-12 and weights[0] > simplex_weights(logits, floor)[0]
    init = simplex_weights(initial_logits(3, primary=1, primary_weight=0.6, floor=floor), floor)
    torch.testing.assert_close(init, torch.tensor([0.2, 0.6, 0.2], dtype=torch.float32))


def test_fedmoa_saturated_auxiliary_gets_no_hypergradient_and_the_primary_gains_weight():
    g_prev = [torch.tensor([1.0, 2.0])]
    g_now = [torch.tensor([0.8, 1.9])]
    h = objective_hypergradient(g_now, [g_prev, [torch.zeros(2)]], lr=0.1, normalize=True)
    assert h[0] < 0 and h[1] == 0
    logits = initial_logits(2, 0, 0.5, 0.05)
    assert simplex_weights(logits_step(logits, h, 0.5, 0.05), 0.05)[0] > 0.5


def fedmoa_module(**kw):
    return make_module(module_class=FedMOAModule, reward_funcs=[length_reward, answer_tag_reward], **kw)


def test_fedmoa_step_backpropagates_each_objective_and_moves_the_weights():
    import lightning as L

    from fedrl_lightning.client import local_step

    module = fedmoa_module(hypergrad_lr=1.0)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
    examples = make_data().train_examples(0)[:2]
    before = module.objective_weights().clone()
    local_step(fabric, wrapped, optimizer, _backend(), examples)
    torch.testing.assert_close(module.objective_weights(), before)  # one step: no previous gradient yet
    local_step(fabric, wrapped, optimizer, _backend(), examples)
    metrics = module.tracker.compute_and_reset()
    assert not torch.allclose(module.objective_weights(), before)
    assert {"fedmoa/weight/length_reward", "fedmoa/weight/answer_tag_reward"} <= metrics.keys()
    assert "fedmoa/hypergrad/length_reward" in metrics and metrics["accuracy"] == 0.0  # random model: accuracy_reward
    with pytest.raises(ValueError, match="at least 2 reward_funcs"):
        make_module(module_class=FedMOAModule, reward_funcs=[length_reward])


def _backend():
    from fedrl_lightning.rollout.hf import HFRollout

    return HFRollout()


def test_fedmoa_weights_are_client_private_and_reach_the_task_aware_server(tmp_path):
    seen = []

    class Spy:
        def on_before_aggregate(self, updates):
            seen.extend(updates)

    trainer = FederatedTrainer(
        num_rounds=2,
        local_steps=2,
        aggregation=TaskAwareFedAvg(),
        callbacks=[Spy()],
        output_dir=str(tmp_path),
        progress=False,
    )
    module = fedmoa_module(hypergrad_lr=1.0, accuracy_func=length_reward)
    trainer.fit(module, make_data())
    logits = [trainer.client_states[cid].extra["module"]["fedmoa_logits"] for cid in (0, 1)]
    assert not torch.equal(logits[0], logits[1])  # each client adapts its own weights
    assert "fedmoa_logits" not in str(list(trainer.global_state))  # never aggregated
    assert {u.extra["task"] for u in seen} == {"basic_arithmetic", "leg_counting"}
    assert all(0.0 <= u.extra["accuracy"] <= 1.0 for u in seen)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "client0/fedmoa/weight/length_reward" in header


# -- every algorithm through the CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", ALGORITHMS, ids=[c.stem for c in ALGORITHMS])
def test_each_algorithm_config_runs_through_the_cli(config, tmp_path):
    out = tmp_path / "run"
    args = ["fit", "-c", "configs/tiny.yaml", "-c", str(config), "--trainer.output_dir", str(out)]
    FedRLCLI(args=[*args, "--trainer.num_rounds", "1", *CLI_OVERRIDES.get(config.stem, [])])
    assert (out / "adapter" / "adapter_config.json").is_file()
    saved, fragment = yaml.safe_load((out / "config.yaml").read_text()), yaml.safe_load(config.read_text())
    for section, key in (("trainer", "aggregation"), ("model", None)):
        part = fragment.get(section, {})
        part = part.get(key) if key else part
        if part:  # the fragment's class reached the run
            saved_part = saved[section][key] if key else saved[section]
            assert saved_part["class_path"] == part["class_path"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 3  # header, round 0 evaluation, the rounds


# -- resume: client-private algorithm state survives a restart ------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["scaffold", "fedmoa"])
def test_resume_continues_client_side_state_exactly(algorithm, tmp_path):
    def trainer_and_module(out, rounds):
        aggregation = Scaffold() if algorithm == "scaffold" else TaskAwareFedAvg()
        module = fedmoa_module(hypergrad_lr=1.0) if algorithm == "fedmoa" else make_module()
        trainer = FederatedTrainer(num_rounds=rounds, aggregation=aggregation, output_dir=str(out), progress=False)
        return trainer, module

    straight, module = trainer_and_module(tmp_path / "straight", 2)
    straight.fit(module, make_data(), ckpt_path=None)
    first, module = trainer_and_module(tmp_path / "resumed", 1)
    first.fit(module, make_data(), ckpt_path=None)
    resumed, module = trainer_and_module(tmp_path / "resumed", 2)
    resumed.fit(module, make_data(), ckpt_path="last")
    assert all(torch.equal(straight.global_state[k], v) for k, v in resumed.global_state.items())
    key = "scaffold_c" if algorithm == "scaffold" else "module"
    for cid in (0, 1):
        a, b = straight.client_states[cid].extra[key], resumed.client_states[cid].extra[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
