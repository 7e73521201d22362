"""FGRPO relative-gain weighting: gains and weights by hand, and a run through the trainer."""

import math

import pytest
import torch

from conftest import make_data, make_module
from fedrl_lightning.aggregation import FedAvg, RelativeGainWeighting, weighted_average
from fedrl_lightning.trainer import FederatedTrainer


def test_gain_against_each_baseline_kind():
    cb = RelativeGainWeighting(beta=0.5, eps=0.0)
    g, h = cb.client_gain({}, 0.2)
    assert g == 0.0 and h == {"ema": 0.2, "values": [0.2], "best": 0.2}
    g, h = cb.client_gain(h, 0.3)
    assert g == pytest.approx((0.3 - 0.2) / 0.2) and h["ema"] == pytest.approx(0.25)
    g, _ = RelativeGainWeighting(gain="diff", beta=0.5).client_gain(h, 0.5)
    assert g == pytest.approx(0.5 - 0.25)
    g, _ = RelativeGainWeighting(baseline="window", window=2, eps=0.0).client_gain(h, 0.5)
    assert g == pytest.approx((0.5 - 0.25) / 0.25)  # mean of [0.2, 0.3]
    g, _ = RelativeGainWeighting(baseline="best", eps=0.0).client_gain(h, 0.15)
    assert g == pytest.approx((0.15 - 0.3) / 0.3)


def test_weights_softmax_with_floor_by_hand():
    cb = RelativeGainWeighting(zscore=False, temperature=1.0, floor=0.1)
    w = cb.weights([0.0, math.log(3.0)], [1.0, 1.0])
    # softmax = (1/4, 3/4); alpha = 0.9 * p + 0.05
    assert w == pytest.approx([0.9 * 0.25 + 0.05, 0.9 * 0.75 + 0.05])
    assert sum(cb.weights([5.0, -2.0, 0.3], [1, 1, 1])) == pytest.approx(1.0)
    # z-scoring makes the weights independent of the reward scale
    z = RelativeGainWeighting()
    assert z.weights([1.0, 2.0], [1, 1]) == pytest.approx(z.weights([10.0, 20.0], [1, 1]))
    assert RelativeGainWeighting().weights([0.0, 0.0], [1, 3]) == pytest.approx([0.5, 0.5])
    assert RelativeGainWeighting(weight_by_samples=True).weights([0.0, 0.0], [1, 3]) == pytest.approx([0.25, 0.75])


def test_fgrpo_sets_aggregation_weights_in_a_run_and_keeps_baselines_on_clients(tmp_path):
    fgrpo = RelativeGainWeighting(aggregator=FedAvg())
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=fgrpo,
        output_dir=str(tmp_path),
        progress=False,
        eval_before_training=False,
        eval_batch_size=4,
    )
    trainer.fit(make_module(), make_data())
    last = trainer.history[-1]
    weights = [last["client0/fgrpo/weight"], last["client1/fgrpo/weight"]]
    assert sum(weights) == pytest.approx(1.0)
    assert all("fgrpo_history" in trainer.client_states[c].extra for c in (0, 1))
    assert trainer.history[0]["round"] == 1 and trainer.history[0]["client0/fgrpo/gain"] == 0.0  # no baseline yet
    assert fgrpo.server_history == {}  # the server never saw a baseline, only the gains


def test_fgrpo_weights_are_what_the_inner_aggregator_averages_with():
    from fedrl_lightning.aggregation import ClientUpdate

    fgrpo = RelativeGainWeighting(aggregator=FedAvg(), baseline_on_client=False)
    state = {"w": torch.zeros(2)}
    updates = [ClientUpdate(i, {"w": torch.full((2,), float(i))}, 1, metrics={"reward": 0.5}) for i in (0, 1)]
    fgrpo.aggregate(state, updates)  # round 1 sets the baselines, equal weights
    rewards = {0: 0.5, 1: 1.0}
    updates = [ClientUpdate(i, {"w": torch.full((2,), float(i))}, 1, metrics={"reward": rewards[i]}) for i in (0, 1)]
    new = fgrpo.aggregate(state, updates)
    alphas = [u.weight for u in updates]
    assert alphas[1] > alphas[0] and sum(alphas) == pytest.approx(1.0)
    torch.testing.assert_close(new["w"], weighted_average([u.state for u in updates], alphas)["w"])
    assert set(fgrpo.state_dict()["server_history"]) == {0, 1}
