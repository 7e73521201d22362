"""Server aggregators against hand computations on tiny tensors (formulas: research/fed_anchors.md §6)."""

import io
import math

import pytest
import torch

from fedrl_lightning.aggregation import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedYogi,
    Krum,
    Scaffold,
    TaskAwareFedAvg,
    TrimmedMean,
    lora_pairs,
    product_average,
    proximal_term,
    scaffold_correction,
    scaffold_new_client_c,
)

F64 = torch.float64
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
PLAIN_KEY = "base_model.model.model.norm.weight"


def vec(*values):
    return torch.tensor(values, dtype=F64)


def upd(cid, state, n=1, tokens=0, weight=None, **extra):
    return ClientUpdate(cid, state, n, tokens, weight=weight, extra=extra)


def moved(cid, global_state, delta, n=1, **kwargs):
    """A client whose adapter is the global one plus ``delta`` (a dict of tensors)."""
    return upd(cid, {k: global_state[k] + delta[k] for k in global_state}, n, **kwargs)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# -------------------------------------------------------------------------------------------------------- FedAvgM


def test_fedavgm_two_rounds_by_hand():
    agg = FedAvgM(server_lr=0.5, momentum=0.9)
    x0 = {"w": vec(0.0, 1.0)}
    # Round 1: deltas [1, 0] (1 prompt) and [3, 4] (3 prompts): Δ̄ = 0.25*[1, 0] + 0.75*[3, 4] = [2.5, 3.0].
    # v1 = Δ̄ = [2.5, 3.0]; x1 = [0, 1] + 0.5 * v1 = [1.25, 2.5].
    x1 = agg.aggregate(x0, [moved(0, x0, {"w": vec(1.0, 0.0)}, 1), moved(1, x0, {"w": vec(3.0, 4.0)}, 3)])
    close(x1["w"], [1.25, 2.5])
    # Round 2: deltas [1, -1] and [0, 1], equal prompts: Δ̄ = [0.5, 0].
    # v2 = 0.9 * [2.5, 3.0] + [0.5, 0] = [2.75, 2.7]; x2 = [1.25, 2.5] + 0.5 * v2 = [2.625, 3.85].
    x2 = agg.aggregate(x1, [moved(0, x1, {"w": vec(1.0, -1.0)}), moved(1, x1, {"w": vec(0.0, 1.0)})])
    close(x2["w"], [2.625, 3.85])
    close(agg.state_dict()["momentum_buffer"]["w"], [2.75, 2.7])


def test_fedavgm_without_momentum_is_fedavg_and_keeps_dtype():
    x = {"w": torch.tensor([1.0, 2.0])}
    updates = [moved(0, x, {"w": torch.tensor([0.5, 0.0])}, 1), moved(1, x, {"w": torch.tensor([1.5, -1.0])}, 3)]
    out = FedAvgM(momentum=0.0).aggregate(x, updates)
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], FedAvg().aggregate(x, updates)["w"])


# ------------------------------------------------------------------------------------ FedAdagrad / FedAdam / FedYogi

# Shared hand example: eta=1, beta_1=0.5, beta_2=0.75, tau=0.5, v_0=0 (initial_v=0.0), Reddi et al.'s formulas (no
# bias correction unless asked).
# Round 1: client deltas [2, -2] (3 prompts) and [10, -10] (1 prompt): Δ̄ = 0.75*2 + 0.25*10 = 4 (and -4).
# Round 2: one client with delta [1, -1]: Δ̄ = 1 (and -1).
HAND = dict(eta=1.0, beta_1=0.5, tau=0.5, initial_v=0.0, convention="reddi")


def _two_rounds(agg):
    x0 = {"w": vec(0.0, 0.0)}
    r1 = [moved(0, x0, {"w": vec(2.0, -2.0)}, 3), moved(1, x0, {"w": vec(10.0, -10.0)}, 1)]
    x1 = agg.aggregate(x0, r1)
    x2 = agg.aggregate(x1, [moved(0, x1, {"w": vec(1.0, -1.0)})])
    return x1["w"], x2["w"]


def test_fedadam_by_hand():
    x1, x2 = _two_rounds(FedAdam(beta_2=0.75, **HAND))
    # Round 1: m = 0.5*0 + 0.5*4 = 2; v = 0.75*0 + 0.25*16 = 4; x1 = 0 + 2 / (2 + 0.5) = 0.8.
    close(x1, [0.8, -0.8])
    # Round 2: m = 0.5*2 + 0.5*1 = 1.5; v = 0.75*4 + 0.25*1 = 3.25; x2 = 0.8 + 1.5 / (sqrt(3.25) + 0.5) ≈ 1.451388.
    step = 1.5 / (math.sqrt(3.25) + 0.5)
    close(x2, [0.8 + step, -0.8 - step])
    assert abs(x2[0].item() - 1.451388) < 1e-6


def test_fedyogi_by_hand():
    x1, x2 = _two_rounds(FedYogi(beta_2=0.75, **HAND))
    # Round 1: m = 2; v = 0 - 0.25*16*sign(0 - 16) = 4; x1 = 2 / (2 + 0.5) = 0.8 (same as Adam).
    close(x1, [0.8, -0.8])
    # Round 2: m = 1.5; v = 4 - 0.25*1*sign(4 - 1) = 3.75; x2 = 0.8 + 1.5 / (sqrt(3.75) + 0.5) ≈ 1.415639.
    step = 1.5 / (math.sqrt(3.75) + 0.5)
    close(x2, [0.8 + step, -0.8 - step])
    assert abs(x2[0].item() - 1.415639) < 1e-6


def test_fedadagrad_by_hand():
    x1, x2 = _two_rounds(FedAdagrad(eta=1.0, tau=0.5))  # Flower: beta_1 = 0 so m = Δ̄; v_0 = 0
    # Round 1: m = 4; v = 0 + 16 = 16; x1 = 4 / (4 + 0.5) = 8/9.
    close(x1, [8 / 9, -8 / 9])
    # Round 2: m = 1; v = 16 + 1 = 17; x2 = 8/9 + 1 / (sqrt(17) + 0.5) ≈ 1.105194.
    step = 1 / (math.sqrt(17) + 0.5)
    close(x2, [8 / 9 + step, -8 / 9 - step])
    assert abs(x2[0].item() - 1.105194) < 1e-6


def test_fedadam_bias_correction_by_hand():
    x1, x2 = _two_rounds(FedAdam(beta_2=0.75, bias_correction=True, **HAND))
    # Round 1 (t=1): eta_1 = sqrt(1 - 0.75) / (1 - 0.5) = 1, so x1 = 0.8 as without correction.
    close(x1, [0.8, -0.8])
    # Round 2 (t=2): eta_2 = sqrt(1 - 0.75**2) / (1 - 0.5**2) ≈ 0.881917; x2 = 0.8 + eta_2 * 1.5 / (sqrt(3.25) + 0.5).
    step = math.sqrt(1 - 0.75**2) / 0.75 * 1.5 / (math.sqrt(3.25) + 0.5)
    close(x2, [0.8 + step, -0.8 - step])


def test_fedadam_flower_bias_correction_is_one_step_ahead_by_hand():
    x1, x2 = _two_rounds(FedAdam(beta_2=0.75, **{**HAND, "convention": "flower"}))
    # Flower's exponent is server_round + 1: round 1 uses 2, round 2 uses 3.
    eta_1 = math.sqrt(1 - 0.75**2) / (1 - 0.5**2)  # ≈ 0.881917
    close(x1, [eta_1 * 0.8, -eta_1 * 0.8])  # m = 2, v = 4 as in test_fedadam_by_hand
    eta_2 = math.sqrt(1 - 0.75**3) / (1 - 0.5**3)
    step = eta_2 * 1.5 / (math.sqrt(3.25) + 0.5)
    close(x2, [eta_1 * 0.8 + step, -eta_1 * 0.8 - step])


def test_fedadam_flower_defaults_one_round():
    agg = FedAdam()  # Flower (1.32 to 1.42): eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, v_0 = 0, bias-corrected
    assert (agg.eta, agg.beta_1, agg.beta_2, agg.tau, agg.initial_v, agg.bias_correction) == (
        0.1,
        0.9,
        0.99,
        1e-3,
        0.0,
        True,
    )
    x0 = {"w": vec(1.0)}
    out = agg.aggregate(x0, [moved(0, x0, {"w": vec(0.2)})])
    # m = 0.1 * 0.2 = 0.02; v = 0.01 * 0.04 = 4e-4; eta_1 = 0.1 * sqrt(1 - 0.99**2) / (1 - 0.9**2) ≈ 0.0742460;
    # x = 1 + eta_1 * 0.02 / (0.02 + 1e-3) ≈ 1.070710.
    eta_1 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    close(out["w"], [1 + eta_1 * 0.02 / (0.02 + 1e-3)])
    assert abs(out["w"].item() - 1.070710) < 1e-6
    assert FedYogi().eta == 0.01 and FedAdagrad().beta_1 == 0.0
    assert FedYogi().initial_v == FedAdagrad().initial_v == 0.0
    assert not FedYogi().bias_correction and not FedAdagrad().bias_correction


def test_reddi_convention_starts_v_at_tau_squared_without_bias_correction():
    agg = FedAdam(convention="reddi")
    assert (agg.initial_v, agg.bias_correction) == (1e-6, False)
    x0 = {"w": vec(1.0)}
    out = agg.aggregate(x0, [moved(0, x0, {"w": vec(0.2)})])
    # m = 0.02; v = 0.99 * 1e-6 + 0.01 * 0.04 = 4.0099e-4; x = 1 + 0.1 * 0.02 / (sqrt(v) + 1e-3) ≈ 1.095126.
    close(out["w"], [1 + 0.1 * 0.02 / (math.sqrt(0.99e-6 + 0.01 * 0.04) + 1e-3)])
    assert abs(out["w"].item() - 1.095126) < 1e-6
    assert FedYogi(convention="reddi").initial_v == 1e-6
    assert FedAdagrad(tau=0.1, convention="reddi").initial_v == pytest.approx(0.01)


# ------------------------------------------------------------------------------------------------ resume exactness


def _lora_state(gen, scale=1.0):
    return {
        A_KEY: torch.randn(2, 4, generator=gen) * scale,
        B_KEY: torch.randn(3, 2, generator=gen) * scale,
        PLAIN_KEY: torch.randn(3, generator=gen) * scale,
    }


def _scripted_rounds(num_rounds=4, num_clients=3):
    gen = torch.Generator().manual_seed(0)
    return [
        [(_lora_state(gen, 0.1), 1 + c, _lora_state(gen, 0.01)) for c in range(num_clients)] for _ in range(num_rounds)
    ]


def _run(agg, global_state, rounds):
    for script in rounds:
        updates = [moved(c, global_state, delta, n, scaffold_delta_c=dc) for c, (delta, n, dc) in enumerate(script)]
        global_state = agg.aggregate(global_state, updates)
    return global_state


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(server_lr=0.7),
        lambda: FedAvgM(lora_mode="product"),
        lambda: FedAdagrad(eta=1e-2),
        lambda: FedAdam(eta=1e-2, bias_correction=True),
        lambda: FedYogi(),
        lambda: Scaffold(server_lr=0.9, num_clients=5),
    ],
)
def test_state_dict_round_trip_resumes_bit_identically(make):
    rounds = _scripted_rounds()
    x0 = _lora_state(torch.Generator().manual_seed(1))
    straight = make()
    expected = _run(straight, x0, rounds)

    first = make()
    x_mid = _run(first, x0, rounds[:2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    actual = _run(resumed, x_mid, rounds[2:])

    for key in expected:
        assert actual[key].dtype == torch.float32
        assert torch.equal(actual[key], expected[key]), key
    for name, tensors in straight.state_dict().items():
        if isinstance(tensors, dict):
            assert all(torch.equal(resumed.state_dict()[name][k], v) for k, v in tensors.items())
        else:
            assert resumed.state_dict()[name] == tensors


def test_server_optimizer_rejects_mismatched_keys():
    x = {"w": vec(1.0)}
    with pytest.raises(ValueError, match="different keys"):
        FedAdam().aggregate(x, [upd(0, {"v": vec(1.0)})])
    agg = FedAvgM()
    agg.load_state_dict({"momentum_buffer": {"other": vec(0.0)}})
    with pytest.raises(ValueError, match="momentum buffer"):
        agg.aggregate(x, [upd(0, {"w": vec(2.0)})])


# --------------------------------------------------------------------------------------------------------- FedProx


def test_fedprox_proximal_term_value_and_gradient():
    params = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]]), "unused": torch.ones(1)}
    agg = FedProx(mu=0.1)
    term = agg.proximal_term(params, anchor)
    # 0.1 / 2 * (1 + 4 + (3 - 1)**2) = 0.05 * 9 = 0.45
    assert term.item() == pytest.approx(0.45)
    assert proximal_term(params, anchor, 0.1).item() == pytest.approx(0.45)
    term.backward()
    # d/dw = mu * (w - anchor)
    torch.testing.assert_close(params["a"].grad, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(params["b"].grad, torch.tensor([[0.2]]))
    assert proximal_term(params, anchor, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="anchor has no tensor"):
        proximal_term({"c": torch.ones(1)}, anchor, 0.1)


def test_fedprox_server_side_is_fedavg():
    updates = [upd(0, {"w": vec(1.0)}, 1), upd(1, {"w": vec(5.0)}, 3)]
    assert FedProx(mu=0.1).aggregate({}, updates)["w"].item() == FedAvg().aggregate({}, updates)["w"].item() == 4.0


# -------------------------------------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_server_update_by_hand():
    agg = Scaffold(server_lr=0.5, num_clients=4)
    x0 = {"w": vec(1.0, 2.0)}
    close(agg.control_variate(x0)["w"], [0.0, 0.0])
    updates = [
        moved(0, x0, {"w": vec(0.2, 0.4)}, 1, scaffold_delta_c={"w": vec(1.0, 2.0)}),
        moved(1, x0, {"w": vec(0.6, 0.0)}, 9, scaffold_delta_c={"w": vec(3.0, 0.0)}),
    ]
    x1 = agg.aggregate(x0, updates)
    # Uniform mean of the deltas: [0.4, 0.2]; x1 = [1, 2] + 0.5 * [0.4, 0.2] = [1.2, 2.1].
    close(x1["w"], [1.2, 2.1])
    # c = 0 + (|S| / N) * mean(Δc) = (2 / 4) * [2, 1] = [1, 0.5].
    close(agg.control_variate(x1)["w"], [1.0, 0.5])
    # Round 2, one client: c = [1, 0.5] + (1 / 4) * [4, -2] = [2, 0].
    agg.aggregate(x1, [moved(0, x1, {"w": vec(0.0, 0.0)}, scaffold_delta_c={"w": vec(4.0, -2.0)})])
    close(agg.control_variate(x1)["w"], [2.0, 0.0])
    # num_clients=None: N = |S|, so c += mean(Δc).
    full = Scaffold()
    full.aggregate(x0, updates)
    close(full.control_variate(x0)["w"], [2.0, 1.0])


def test_scaffold_errors():
    x0 = {"w": vec(1.0)}
    with pytest.raises(ValueError, match="scaffold_delta_c"):
        Scaffold().aggregate(x0, [upd(0, {"w": vec(2.0)})])
    with pytest.raises(ValueError, match="num_clients is 1"):
        dc = {"w": vec(0.0)}
        Scaffold(num_clients=1).aggregate(x0, [upd(0, x0, scaffold_delta_c=dc), upd(1, x0, scaffold_delta_c=dc)])


def test_scaffold_client_helpers_by_hand():
    grad = {"w": torch.tensor([1.0, 2.0])}
    c, c_i = {"w": torch.tensor([0.5, 0.5])}, {"w": torch.tensor([0.25, 1.0])}
    # g + c - c_i = [1 + 0.5 - 0.25, 2 + 0.5 - 1] = [1.25, 1.5]
    torch.testing.assert_close(scaffold_correction(grad, c, c_i)["w"], torch.tensor([1.25, 1.5]))
    torch.testing.assert_close(scaffold_correction(grad, {}, {})["w"], grad["w"])
    x, y = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.8, 2.2])}
    # c_i+ = c_i - c + (x - y) / (K lr) = [0.25, 1] - [0.5, 0.5] + [0.2, -0.2] / (4 * 0.05) = [0.75, -0.5]
    new = scaffold_new_client_c(c_i, c, x, y, num_steps=4, lr=0.05)
    torch.testing.assert_close(new["w"], torch.tensor([0.75, -0.5]))
    assert new["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="num_steps and lr"):
        scaffold_new_client_c(c_i, c, x, y, num_steps=0, lr=0.05)


def test_scaffold_removes_client_drift_on_quadratics():
    """f_i(w) = h_i/2 (w - a_i)^2 with h = (1, 4), a = (0, 1): the optimum of Σ f_i is Σ h_i a_i / Σ h_i = 0.8."""
    h, a, steps, lr = (1.0, 4.0), (0.0, 1.0), 10, 0.1

    def local(w0, i, c_global, c_client):
        w = w0.clone()
        for _ in range(steps):
            g = {"w": h[i] * (w - a[i])}
            w = w - lr * scaffold_correction(g, c_global, c_client)["w"]
        return w

    def run(use_scaffold):
        agg = Scaffold() if use_scaffold else FedAvg("uniform")
        x, c_clients = {"w": vec(0.0)}, [{}, {}]
        for _ in range(60):
            c = agg.control_variate(x) if use_scaffold else {}
            updates = []
            for i in range(2):
                y = {"w": local(x["w"], i, c, c_clients[i] if use_scaffold else {})}
                new_c = scaffold_new_client_c(c_clients[i], c, x, y, steps, lr)
                delta_c = {"w": new_c["w"] - c_clients[i].get("w", 0.0)}
                c_clients[i] = new_c
                updates.append(upd(i, y, scaffold_delta_c=delta_c))
            x = agg.aggregate(x, updates)
        return x["w"].item()

    assert run(True) == pytest.approx(0.8, abs=1e-6)
    assert abs(run(False) - 0.8) > 0.05  # FedAvg drifts towards the high-curvature client's optimum


# ----------------------------------------------------------------------------------------------------------- robust

# Five clients on one coordinate (plus a second tensor 2x the first): values 0, 1, 2, 3.5 and an outlier 100.
ROBUST_VALUES = (0.0, 1.0, 2.0, 3.5, 100.0)


def _robust_updates(values=ROBUST_VALUES, prompts=(2, 1, 1, 1, 1)):
    states = [{"a": vec(v), "b": vec(2 * v, -v).reshape(1, 2)} for v in values]
    return [upd(i, state, n) for i, (state, n) in enumerate(zip(states, prompts))]


def test_median_ignores_the_outlier():
    out = FedMedian().aggregate({}, _robust_updates())
    close(out["a"], [2.0])  # median of 0, 1, 2, 3.5, 100
    close(out["b"], [[4.0, -2.0]])
    # Even count: mean of the two middle values (0, 1, 3.5, 100 -> 2.25), not torch.median's lower one.
    close(FedMedian().aggregate({}, _robust_updates((0.0, 1.0, 3.5, 100.0), (1,) * 4))["a"], [2.25])


def test_trimmed_mean_by_hand():
    updates = _robust_updates()
    # beta = 0.2, n = 5: drop 1 from each end -> mean(1, 2, 3.5) = 6.5 / 3.
    close(TrimmedMean(beta=0.2).aggregate({}, updates)["a"], [6.5 / 3])
    close(TrimmedMean(beta=0.2).aggregate({}, updates)["b"], [[13 / 3, -6.5 / 3]])
    # beta = 0.1, n = 5: floor(0.5) = 0 trimmed -> plain mean 106.5 / 5.
    close(TrimmedMean(beta=0.1).aggregate({}, updates)["a"], [106.5 / 5])
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        TrimmedMean(beta=0.5)


def test_krum_scores_and_selection_by_hand():
    # f = 1, n = 5: each score sums the n - f - 2 = 2 smallest squared distances to the others. Distances are over
    # both tensors flattened: (Δv)^2 * (1 + 4 + 1) = 6 (Δv)^2.
    # client 0 (v=0): nearest 1, 2 -> 1 + 4 = 5;  client 1 (v=1): 0, 2 -> 1 + 1 = 2;
    # client 2 (v=2): 1, 3.5 -> 1 + 2.25 = 3.25;  client 3 (v=3.5): 2, 1 -> 2.25 + 6.25 = 8.5;
    # client 4 (v=100): 3.5, 2 -> 96.5^2 + 98^2.
    updates = _robust_updates()
    krum = Krum(num_malicious=1)
    close(krum.scores([u.state for u in updates]), [6 * s for s in (5.0, 2.0, 3.25, 8.5, 96.5**2 + 98**2)])
    out = krum.aggregate({}, updates)
    close(out["a"], [1.0])  # Krum keeps client 1's adapter
    assert krum.last_selected == [1]
    multi = Krum(num_malicious=1, num_selected=3)
    # MultiKrum keeps clients 1, 2, 0 and averages them by prompts (1, 1, 2): (1 + 2 + 2*0) / 4 = 0.75.
    close(multi.aggregate({}, updates)["a"], [0.75])
    assert sorted(multi.last_selected) == [0, 1, 2] and 4 not in multi.last_selected
    assert Krum(1, 3, weighting="uniform").aggregate({}, updates)["a"].item() == pytest.approx(1.0)


def test_krum_needs_more_than_2f_plus_2_clients():
    updates = _robust_updates()[:4]
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*n=4.*f=1.*n >= 5"):
        Krum(num_malicious=1).aggregate({}, updates)
    Krum(num_malicious=0).aggregate({}, updates)  # 4 > 2
    with pytest.raises(ValueError, match="num_selected=5"):
        Krum(num_selected=5).aggregate({}, updates)


@pytest.mark.parametrize("attack", ["scaled_100x", "flipped_sign"])
def test_robust_aggregators_resist_one_poisoned_client_and_fedavg_does_not(attack):
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(64, generator=gen, dtype=F64)}
    honest = [torch.ones(64, dtype=F64) + 0.1 * torch.randn(64, generator=gen, dtype=F64) for _ in range(4)]
    poison = 100 * honest[0] if attack == "scaled_100x" else -honest[0]
    deltas = [*honest, poison]
    updates = [upd(i, {"w": x["w"] + d}) for i, d in enumerate(deltas)]
    target = x["w"] + torch.stack(honest).mean(0)

    def error(agg) -> float:
        return float((agg.aggregate(x, updates)["w"] - target).norm() / (target - x["w"]).norm())

    fedavg = error(FedAvg("uniform"))
    assert fedavg > (19.0 if attack == "scaled_100x" else 0.35)  # the poison moves the mean by (p - h)/5
    for agg in (FedMedian(), TrimmedMean(beta=0.2), Krum(num_malicious=1), Krum(num_malicious=1, num_selected=3)):
        assert error(agg) < 0.15, (type(agg).__name__, error(agg), fedavg)


# ------------------------------------------------------------------------------------------------------ LoRA modes


def _factors(gen, out=3, r=2, inp=4):
    return torch.randn(out, r, generator=gen, dtype=F64), torch.randn(r, inp, generator=gen, dtype=F64)


def _lora(b, a, plain=None):
    state = {A_KEY: a, B_KEY: b}
    if plain is not None:
        state[PLAIN_KEY] = plain
    return state


def test_lora_pairs():
    state = _lora(torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(3))
    assert lora_pairs(state) == {"base_model.model.model.layers.0.self_attn.q_proj": (A_KEY, B_KEY)}
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs({A_KEY: torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="without their A"):
        lora_pairs({B_KEY: torch.zeros(3, 2)})


def test_product_mode_of_identical_clients_keeps_the_product():
    b, a = _factors(torch.Generator().manual_seed(0))
    out = product_average([_lora(b, a), _lora(b.clone(), a.clone())], [1.0, 3.0])
    assert out[A_KEY].shape == (2, 4) and out[B_KEY].shape == (3, 2)
    close(out[B_KEY] @ out[A_KEY], b @ a, tol=1e-10)


def test_product_mode_is_the_exact_mean_when_its_rank_fits():
    gen = torch.Generator().manual_seed(1)
    (b1, a), (b2, _) = _factors(gen), _factors(gen)
    # A shared A makes the mean product (0.25 B1 + 0.75 B2) A of rank <= r = 2.
    mean = 0.25 * (b1 @ a) + 0.75 * (b2 @ a)
    u, s, vh = torch.linalg.svd(mean)
    assert s[2:].abs().max() < 1e-10
    agg = FedAvg(lora_mode="product")
    out = agg.aggregate({}, [upd(0, _lora(b1, a, vec(1.0, 2.0, 3.0)), 1), upd(1, _lora(b2, a, vec(5.0, 6.0, 7.0)), 3)])
    close(out[B_KEY] @ out[A_KEY], (u[:, :2] * s[:2]) @ vh[:2], tol=1e-10)
    close(out[B_KEY] @ out[A_KEY], mean, tol=1e-10)
    close(out[PLAIN_KEY], [4.0, 5.0, 6.0])  # plain key: 0.25 * [1, 2, 3] + 0.75 * [5, 6, 7]


def test_product_mode_is_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(2)
    (b1, a1), (b2, a2) = _factors(gen), _factors(gen)
    mean = 0.5 * (b1 @ a1) + 0.5 * (b2 @ a2)  # rank 3 > r = 2
    u, s, vh = torch.linalg.svd(mean)
    out = product_average([_lora(b1, a1), _lora(b2, a2)], [1.0, 1.0])
    close(out[B_KEY] @ out[A_KEY], (u[:, :2] * s[:2]) @ vh[:2], tol=1e-10)
    # Balanced factors: ||B[:, j]|| = ||A[j]|| = sqrt(s_j).
    close(out[B_KEY].norm(dim=0), s[:2].sqrt(), tol=1e-10)
    close(out[A_KEY].norm(dim=1), s[:2].sqrt(), tol=1e-10)


def test_product_mode_keeps_a_alive_when_no_client_moved_b():
    gen = torch.Generator().manual_seed(3)
    (_, a1), (_, a2) = _factors(gen), _factors(gen)
    out = product_average([_lora(torch.zeros(3, 2, dtype=F64), a1), _lora(torch.zeros(3, 2, dtype=F64), a2)], [1, 1])
    assert torch.equal(out[B_KEY], torch.zeros(3, 2, dtype=F64))
    assert out[A_KEY].norm(dim=1).min() > 0.1  # B can still get a gradient next round


def test_product_mode_server_optimizer_aligns_signs_with_the_global():
    gen = torch.Generator().manual_seed(4)
    b, a = _factors(gen)
    x = product_average([_lora(b, a)], [1.0])
    flip = vec(-1.0, 1.0)  # the global carries SVD component 0 with the opposite sign (same product)
    x = {A_KEY: x[A_KEY] * flip[:, None], B_KEY: x[B_KEY] * flip}
    # A client that did not move the product: Δ̄ must be ~0, so the new global keeps the global's signs.
    out = FedAvgM(momentum=0.0, lora_mode="product").aggregate(x, [upd(0, _lora(-b, -a))])
    close(out[A_KEY], x[A_KEY], tol=1e-10)
    close(out[B_KEY], x[B_KEY], tol=1e-10)
    unaligned = product_average([_lora(-b, -a)], [1.0])
    assert not torch.allclose(unaligned[A_KEY], x[A_KEY])


# ------------------------------------------------------------------------------------------- task-aware (FedMOA)


def _task_updates(**kwargs):
    # math: client 0 (acc 0.5, 2 prompts), client 1 (acc 0.9, 1 prompt); code: client 2 (acc 0.2, 5 prompts).
    return [
        upd(0, {"w": vec(1.0)}, 2, task="math", accuracy=0.5, **kwargs),
        upd(1, {"w": vec(2.0)}, 1, task="math", accuracy=0.9, **kwargs),
        upd(2, {"w": vec(10.0)}, 5, task="code", accuracy=0.2, **kwargs),
    ]


def test_task_aware_weights_by_hand():
    updates = _task_updates()
    agg = TaskAwareFedAvg(temperature=0.5)
    # softmax(0.5 / 0.5, 0.9 / 0.5) = softmax(1.0, 1.8): p0 = 1 / (1 + e^0.8) ≈ 0.310026, p1 ≈ 0.689974.
    # Each task gets 1/2: w = [0.155013, 0.344987, 0.5].
    p0 = 1 / (1 + math.exp(0.8))
    assert agg.weights(updates) == pytest.approx([p0 / 2, (1 - p0) / 2, 0.5])
    # Aggregate: 0.155013 * 1 + 0.344987 * 2 + 0.5 * 10 ≈ 5.844987.
    close(agg.aggregate({}, updates)["w"], [p0 / 2 + (1 - p0) + 5.0])
    # power rule (algorithms.md §4(b)), gamma = 1: n_i a_i = (1.0, 0.9) -> (1/1.9, 0.9/1.9) per math.
    power = TaskAwareFedAvg(accuracy_rule="power")
    assert power.weights(updates) == pytest.approx([0.5 / 1.9, 0.45 / 1.9, 0.5])
    # by samples only: math (2/3, 1/3) * 1/2.
    assert TaskAwareFedAvg(accuracy_weighting=False).weights(updates) == pytest.approx([1 / 3, 1 / 6, 0.5])
    # task shares by samples: math 3/8, code 5/8.
    by_samples = TaskAwareFedAvg(accuracy_weighting=False, task_balance="samples")
    assert by_samples.weights(updates) == pytest.approx([0.25, 0.125, 0.625])


def test_task_aware_needs_accuracy():
    updates = [upd(0, {"w": vec(1.0)}, task="math")]
    with pytest.raises(ValueError, match="client 0.*accuracy"):
        TaskAwareFedAvg().aggregate({}, updates)
    # no task given: one "default" group
    assert TaskAwareFedAvg(accuracy_weighting=False).weights([upd(0, {}, 1), upd(1, {}, 3)]) == [0.25, 0.75]


# --------------------------------------------------------------------------------------- callback weight precedence


def test_callback_weights_take_precedence():
    x = {"w": vec(0.0)}
    updates = [moved(0, x, {"w": vec(1.0)}, 100, weight=0.0), moved(1, x, {"w": vec(3.0)}, 1, weight=1.0)]
    assert FedAvgM(momentum=0.0).aggregate(x, updates)["w"].item() == pytest.approx(3.0)
    assert FedAvg(lora_mode="separate").aggregate(x, updates)["w"].item() == pytest.approx(3.0)
    adam = FedAdam(eta=1.0, beta_1=0.0, beta_2=0.0, tau=1.0, initial_v=0.0)
    assert adam.aggregate(x, updates)["w"].item() == pytest.approx(3.0 / (3.0 + 1.0))  # Δ̄ = 3: 3 / (sqrt(9) + 1)
    tasked = _task_updates()
    for u, w in zip(tasked, (0.0, 0.0, 1.0)):
        u.weight = w
    assert TaskAwareFedAvg().aggregate({}, tasked)["w"].item() == 10.0
    robust = _robust_updates()
    for u, w in zip(robust, (0.0, 1.0, 1.0, 1.0, 1.0)):
        u.weight = w
    assert Krum(1, 3).aggregate({}, robust)["a"].item() == pytest.approx(1.5)  # clients 1, 2 (weight 1), 0 (0)


# ----------------------------------------------------------------------------------------------------- bad args


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FedAvg(weighting="samples"), "weighting"),
        (lambda: FedAvg(lora_mode="stack"), "lora_mode"),
        (lambda: FedAvgM(momentum=1.0), "momentum"),
        (lambda: FedAvgM(server_lr=0.0), "server_lr"),
        (lambda: FedAdam(beta_2=1.0), "beta_2"),
        (lambda: FedYogi(tau=0.0), "tau"),
        (lambda: FedAdagrad(eta=-1.0), "eta"),
        (lambda: FedAdam(initial_v=-1.0), "initial_v"),
        (lambda: FedYogi(convention="paper"), "convention"),
        (lambda: FedProx(mu=-0.1), "mu"),
        (lambda: Scaffold(num_clients=0), "num_clients"),
        (lambda: TaskAwareFedAvg(temperature=0.0), "temperature"),
        (lambda: TaskAwareFedAvg(accuracy_rule="max"), "accuracy_rule"),
        (lambda: Krum(num_malicious=-1), "num_malicious"),
        (lambda: Krum(num_selected=0), "num_selected"),
        (lambda: TrimmedMean(beta=-0.1), "beta"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_empty_round_keeps_global_and_state():
    x = {"w": vec(1.0)}
    for agg in (FedAvgM(), FedAdam(), Scaffold(), TaskAwareFedAvg(), FedMedian(), TrimmedMean(), Krum()):
        assert agg.aggregate(x, []) is x
    assert FedAdam().state_dict() == {"step": 0, "m": {}, "v": {}}
