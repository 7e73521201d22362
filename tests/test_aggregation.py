import pytest
import torch

from fedrl_lightning.aggregation import ClientUpdate, FedAvg, weighted_average


def _update(cid, value, n, tokens=0, weight=None):
    return ClientUpdate(
        cid, {"a": torch.tensor([value, 2 * value]), "b": torch.tensor([[value]])}, n, tokens, weight=weight
    )


def test_fedavg_weighted_by_prompts_matches_hand_computation():
    updates = [_update(0, 1.0, 1), _update(1, 4.0, 3)]
    out = FedAvg().aggregate({}, updates)
    # (1*1 + 3*4) / 4 = 3.25; second entry doubles.
    assert torch.equal(out["a"], torch.tensor([3.25, 6.5]))
    assert torch.equal(out["b"], torch.tensor([[3.25]]))


def test_fedavg_tokens_uniform_and_callback_weights():
    updates = [_update(0, 1.0, 1, tokens=30), _update(1, 4.0, 3, tokens=10)]
    assert FedAvg("tokens").aggregate({}, updates)["a"][0].item() == pytest.approx((30 * 1 + 10 * 4) / 40)
    assert FedAvg("uniform").aggregate({}, updates)["a"][0].item() == pytest.approx(2.5)
    weighted = [_update(0, 1.0, 1, weight=0.0), _update(1, 4.0, 3, weight=1.0)]
    assert FedAvg().aggregate({}, weighted)["a"][0].item() == 4.0


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([{"a": torch.ones(1)}], [0.0])
    with pytest.raises(ValueError, match="nothing"):
        weighted_average([], [])


def test_fedavg_without_updates_keeps_global():
    state = {"a": torch.ones(2)}
    assert FedAvg().aggregate(state, []) is state
