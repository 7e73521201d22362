import pytest
import torch
from safetensors.torch import save

from fedrl_lightning.comm import Channel, NonFiniteUpdateError
from fedrl_lightning.selection import UniformSelector


def test_channel_counts_serialized_bytes_and_copies():
    channel = Channel()
    payload = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    received = channel.send_down(1, 0, payload)
    assert torch.equal(received["w"], payload["w"])
    assert received["w"].data_ptr() != payload["w"].data_ptr()
    channel.send_up(1, 0, payload)
    channel.send_up(2, 1, payload)
    size = len(save(payload))
    assert channel.totals(1) == {"down": size, "up": size}
    assert channel.totals() == {"down": size, "up": 2 * size}
    restored = Channel()
    restored.load_state_dict(channel.state_dict())
    assert restored.ledger() == channel.ledger()


def test_channel_rejects_non_finite_upload_naming_client_and_tensor():
    with pytest.raises(NonFiniteUpdateError, match=r"client 3 .*'bad'"):
        Channel().send_up(1, 3, {"bad": torch.tensor([1.0, float("nan")])})


def test_selector_is_seeded_by_round_and_respects_count():
    sel = UniformSelector(count=2, seed=7)
    ids = list(range(6))
    assert sel.select(3, ids) == sel.select(3, ids)
    assert len(sel.select(3, ids)) == 2
    assert any(sel.select(r, ids) != sel.select(3, ids) for r in range(4, 10))
    assert UniformSelector(fraction=0.5).num_selected(5) == 3
    assert UniformSelector().select(1, [2, 0, 1]) == [0, 1, 2]
    with pytest.raises(ValueError):
        UniformSelector(count=9).select(1, ids)
    with pytest.raises(ValueError):
        UniformSelector(fraction=0.0)
