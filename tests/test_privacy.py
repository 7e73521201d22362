import io
import math

import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

from fedrl_lightning.aggregation import ClientUpdate
from fedrl_lightning.privacy import (
    DPFedAvg,
    PrivacyAccountant,
    PrivacyBudgetExhausted,
    add_gaussian_noise,
    clip_update,
    update_norm,
)


def _norm_updates(norms, num_clients_offset=0):
    """One-element updates from a zero global adapter, so each client's update norm is exactly |norm|."""
    return [ClientUpdate(num_clients_offset + i, {"w": torch.tensor([float(n)])}, 1) for i, n in enumerate(norms)]


def test_update_norm_and_clipping_by_hand():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert update_norm(delta) == 5.0
    clipped, was_clipped = clip_update(delta, 1.0)
    assert was_clipped
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))
    assert update_norm(clipped) == pytest.approx(1.0)
    same, was_clipped = clip_update(delta, 5.0)  # at the clip: unchanged
    assert not was_clipped and all(torch.equal(same[k], delta[k]) for k in delta)
    same, was_clipped = clip_update(delta, 10.0)
    assert not was_clipped and all(torch.equal(same[k], delta[k]) for k in delta)
    with pytest.raises(ValueError):
        clip_update(delta, 0.0)


def test_add_gaussian_noise_is_seeded_and_zero_std_is_identity():
    state = {"a": torch.zeros(1000), "i": torch.arange(3)}
    one = add_gaussian_noise(state, 0.5, torch.Generator().manual_seed(1))
    two = add_gaussian_noise(state, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(one["a"], two["a"]) and torch.equal(one["i"], state["i"])
    assert 0.45 < one["a"].std().item() < 0.55
    assert add_gaussian_noise(state, 0.0, torch.Generator())["a"] is state["a"]


def test_noise_multiplier_zero_is_exact_uniform_mean_of_clipped_deltas():
    # Dyadic numbers so every step is exact in float64. C = 1.
    glob = {"a": torch.tensor([1.0, 1.0], dtype=torch.float64), "b": torch.tensor([[2.0]], dtype=torch.float64)}
    ups = [
        # delta a=[0, 2], b=[[0]] -> norm 2 -> scaled by 1/2 -> [0, 1], [[0]]
        ClientUpdate(0, {"a": torch.tensor([1.0, 3.0], dtype=torch.float64), "b": torch.tensor([[2.0]]).double()}, 10),
        # delta a=[0.25, 0], b=[[0.5]] -> norm < 1 -> unchanged
        ClientUpdate(1, {"a": torch.tensor([1.25, 1.0], dtype=torch.float64), "b": torch.tensor([[2.5]]).double()}, 1),
        # delta a=[-4, 0], b=[[0]] -> norm 4 -> scaled by 1/4 -> [-1, 0]
        ClientUpdate(2, {"a": torch.tensor([-3.0, 1.0], dtype=torch.float64), "b": torch.tensor([[2.0]]).double()}, 5),
        # no change
        ClientUpdate(3, {k: v.clone() for k, v in glob.items()}, 7, weight=100.0),
    ]
    agg = DPFedAvg(num_clients=8, noise_multiplier=0.0, clip_norm=1.0)
    out = agg.aggregate(glob, ups)
    # uniform mean (sample counts and the callback weight are ignored): a = [(0 + 0.25 - 1 + 0) / 4, 1 / 4]
    assert torch.equal(out["a"], torch.tensor([1.0 - 0.1875, 1.25], dtype=torch.float64))
    assert torch.equal(out["b"], torch.tensor([[2.0 + 0.125]], dtype=torch.float64))
    assert agg.metrics()["dp/clipped_fraction"] == 0.5
    assert agg.metrics()["dp/noise_std"] == 0.0
    assert agg.metrics()["dp/epsilon"] == math.inf


def test_noise_multiplier_zero_matches_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    glob = {"a": torch.randn(50, 8, generator=g), "b": torch.randn(8, generator=g)}
    noisy = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(5)]
    ups = [ClientUpdate(i, state, 1) for i, state in enumerate(noisy)]
    out = DPFedAvg(num_clients=5, noise_multiplier=0.0, clip_norm=1.0).aggregate(glob, ups)
    deltas = [clip_update({k: u.state[k] - glob[k] for k in glob}, 1.0)[0] for u in ups]
    for k in glob:
        torch.testing.assert_close(out[k], glob[k] + sum(d[k] for d in deltas) / 5)


def test_noise_std_of_aggregate_matches_noise_multiplier_times_clip_over_m():
    z, clip, m, n = 1.3, 0.5, 4, 100_000
    agg = DPFedAvg(num_clients=10, noise_multiplier=z, clip_norm=clip, seed=3)
    glob = {"w": torch.zeros(n)}
    ups = [ClientUpdate(i, {"w": torch.zeros(n)}, 1) for i in range(m)]  # zero deltas: the output is the noise
    draws = torch.cat([agg.aggregate(glob, ups)["w"] for _ in range(5)])
    expected = z * clip / m
    # 5e5 samples: the relative standard error of the sample std is ~1e-3, so 1% is > 9 sigma.
    assert draws.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(draws.numel())
    assert agg.metrics()["dp/noise_std"] == pytest.approx(expected)


@pytest.mark.parametrize("count_noise", [False, True])
@pytest.mark.parametrize(
    ("sampler", "quantile", "true_quantile"),
    [
        (lambda g, m: torch.rand(m, generator=g, dtype=torch.float64), 0.5, 0.5),
        # LogNormal(0, 1): the 0.8-quantile is exp(Phi^-1(0.8)) = exp(0.841621)
        (lambda g, m: torch.randn(m, generator=g, dtype=torch.float64).exp(), 0.8, math.exp(0.8416212335729143)),
    ],
)
def test_adaptive_clipping_converges_to_target_quantile(sampler, quantile, true_quantile, count_noise):
    m = 50
    kwargs = dict(noise_multiplier=1.0) if count_noise else dict(noise_multiplier=0.0, clipped_count_stddev=0.0)
    agg = DPFedAvg(num_clients=1000, clip_norm=0.05, adaptive_clipping=True, target_quantile=quantile, **kwargs)
    if count_noise:
        assert agg.count_stddev(m) == m / 20
    g = torch.Generator().manual_seed(0)
    glob = {"w": torch.zeros(1, dtype=torch.float64)}
    clips = []
    for _ in range(200):
        agg.aggregate(glob, _norm_updates(sampler(g, m).tolist()))
        clips.append(agg.clip_norm)
    tail = clips[-100:]
    # The mean clip of the last 100 rounds lands within ~4% of the quantile across seeds; tolerance 10%.
    assert sum(tail) / len(tail) == pytest.approx(true_quantile, rel=0.1)


def test_adaptive_clip_moves_down_when_all_under_and_up_when_all_clipped():
    kw = dict(num_clients=10, noise_multiplier=0.0, clip_norm=1.0, adaptive_clipping=True, clip_learning_rate=0.2)
    down = DPFedAvg(**kw)
    down.aggregate({"w": torch.zeros(1)}, _norm_updates([0.01, 0.02, 0.5]))
    assert down.clip_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))
    assert down.clip_norm < 1.0
    up = DPFedAvg(**kw)
    up.aggregate({"w": torch.zeros(1)}, _norm_updates([2.0, 3.0, 10.0]))
    assert up.clip_norm == pytest.approx(math.exp(0.2 * 0.5))
    assert up.metrics()["dp/clipped_fraction"] == 1.0
    assert up.metrics()["dp/clip_norm"] == 1.0  # the clip used this round


def test_adaptive_noise_multiplier_split_and_too_small_count_noise():
    agg = DPFedAvg(num_clients=100, noise_multiplier=1.0, adaptive_clipping=True, clipped_count_stddev=2.0)
    assert agg.mean_noise_multiplier(10) == pytest.approx((1.0 - 1 / 16) ** -0.5)
    assert DPFedAvg(num_clients=100, noise_multiplier=1.0).mean_noise_multiplier(10) == 1.0
    # default sigma_b = m / 20 = 0.5 with 10 clients: 2 sigma_b = z, no real solution
    default = DPFedAvg(num_clients=100, noise_multiplier=1.0, adaptive_clipping=True)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        default.aggregate({"w": torch.zeros(1)}, _norm_updates([0.1] * 10))
    assert default.rounds == 0 and default.accountant.history == []


def test_accountant_matches_opacus_computed_directly():
    acc = PrivacyAccountant()
    assert acc.epsilon(1e-5) == 0.0
    for _ in range(30):
        acc.step(1.1, 0.05)
    for _ in range(10):
        acc.step(0.9, 0.1)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=0.05, noise_multiplier=1.1, steps=30, orders=orders)
    rdp = rdp + rdp_analysis.compute_rdp(q=0.1, noise_multiplier=0.9, steps=10, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert acc.epsilon(1e-5) == pytest.approx(float(eps), rel=1e-12)
    restored = PrivacyAccountant()
    restored.load_state_dict(acc.state_dict())
    assert restored.history == [(1.1, 0.05, 30), (0.9, 0.1, 10)]
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)


def test_dpfedavg_epsilon_is_the_subsampled_gaussian_composition():
    kw = dict(noise_multiplier=1.0, clip_norm=1.0, adaptive_clipping=True, clipped_count_stddev=5.0)
    agg = DPFedAvg(num_clients=50, **kw)
    for _ in range(3):
        agg.aggregate({"w": torch.zeros(1)}, _norm_updates([0.5] * 5))
    orders = RDPAccountant.DEFAULT_ALPHAS
    # accounted at the total noise multiplier z, not the larger z_delta of the mean (Theorem 1)
    rdp = rdp_analysis.compute_rdp(q=0.1, noise_multiplier=1.0, steps=3, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert agg.metrics()["dp/epsilon"] == pytest.approx(float(eps), rel=1e-12)


def _run(agg, rounds, start, glob):
    g = torch.Generator().manual_seed(100 + start)
    for r in range(start, start + rounds):
        g.manual_seed(100 + r)
        ups = [
            ClientUpdate(i, {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in glob.items()}, 1)
            for i in range(6)
        ]
        glob = agg.aggregate(glob, ups)
    return glob


def test_state_dict_round_trip_is_bitwise():
    kw = dict(num_clients=20, noise_multiplier=0.8, clip_norm=0.5, adaptive_clipping=True, seed=7)
    kw["clipped_count_stddev"] = 1.0
    glob = {"a": torch.zeros(16, 4), "b": torch.ones(4, dtype=torch.bfloat16)}
    straight = DPFedAvg(**kw)
    out5 = _run(straight, 5, 0, glob)

    first = DPFedAvg(**kw)
    out3 = _run(first, 3, 0, glob)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = DPFedAvg(**{**kw, "seed": 12345})
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    out = _run(resumed, 2, 3, out3)
    for k in glob:
        assert torch.equal(out[k], out5[k])
    assert resumed.clip_norm == straight.clip_norm and resumed.rounds == straight.rounds == 5
    assert resumed.accountant.history == straight.accountant.history
    assert resumed.metrics() == straight.metrics()


def test_target_epsilon_raises_before_exceeding_and_leaves_state():
    agg = DPFedAvg(num_clients=50, noise_multiplier=1.0, clip_norm=1.0, target_epsilon=3.0)  # q = 0.1: ~6 rounds
    glob = {"w": torch.zeros(1)}
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted) as info:
        for _ in range(30):
            glob = agg.aggregate(glob, _norm_updates([0.5] * 5))
            rounds += 1
    assert 1 < rounds < 30 and agg.rounds == rounds
    assert agg.epsilon <= 3.0
    message = str(info.value)
    assert "epsilon" in message and "target_epsilon=3" in message
    state = agg.state_dict()
    with pytest.raises(PrivacyBudgetExhausted):
        agg.aggregate(glob, _norm_updates([0.5] * 5))
    assert agg.rounds == rounds and torch.equal(agg.generator.get_state(), state["generator"])


def test_argument_validation():
    with pytest.raises(ValueError, match="delta"):
        DPFedAvg(num_clients=200_000)  # delta 1e-5 is not below 1/num_clients
    with pytest.raises(ValueError, match="target_epsilon"):
        DPFedAvg(num_clients=10, noise_multiplier=0.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="population"):
        DPFedAvg(num_clients=2).aggregate({"w": torch.zeros(1)}, _norm_updates([1.0] * 3))
    glob = {"w": torch.zeros(1)}
    assert DPFedAvg(num_clients=2).aggregate(glob, []) is glob
