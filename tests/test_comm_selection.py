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


# -- packing of resident state ---------------------------------------------------------------------------------


def test_pack_keeps_structure_and_values_in_one_buffer_per_dtype():
    from fedrl_lightning.packing import pack

    shared = torch.randn(2, 3)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5)}, 1: {"exp_avg": shared}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}],
        "ids": torch.arange(3),
        "again": (shared, "tag"),
    }
    packed = pack(state)
    assert packed["param_groups"] == state["param_groups"] and packed["again"][1] == "tag"
    floats = [packed["state"][0]["step"], packed["state"][0]["exp_avg"], packed["state"][1]["exp_avg"]]
    for got, want in zip(floats, [state["state"][0]["step"], state["state"][0]["exp_avg"], shared]):
        assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(packed["ids"], state["ids"]) and packed["ids"].dtype == torch.int64
    storages = {t.untyped_storage().data_ptr() for t in floats}
    assert len(storages) == 1  # one float buffer ...
    assert packed["ids"].untyped_storage().data_ptr() not in storages  # ... and one int64 buffer
    assert packed["again"][0] is packed["state"][1]["exp_avg"]  # a tensor referenced twice is stored once
    packed["state"][0]["exp_avg"].add_(1.0)  # a copy: the source is untouched, the neighbour view too
    assert not torch.equal(packed["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert torch.equal(packed["state"][1]["exp_avg"], shared)


def test_channel_delivers_packed_copies():
    channel = Channel()
    payload = {"a": torch.randn(3, 4), "b": torch.randn(7)}
    got = channel.send_up(1, 0, payload)
    assert all(torch.equal(got[k], payload[k]) for k in payload)
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    assert got["a"].untyped_storage().data_ptr() != payload["a"].untyped_storage().data_ptr()


def test_load_optimizer_state_copies_into_resident_tensors_and_never_aliases():
    from fedrl_lightning.packing import load_optimizer_state, pack

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]

    def trained(seed: int) -> dict:
        opt = torch.optim.AdamW(params, lr=0.1)
        torch.manual_seed(seed)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return pack(opt.state_dict())

    a, b = trained(0), trained(1)
    opt = torch.optim.AdamW(params, lr=0.1)
    load_optimizer_state(opt, a)  # first load: a deep copy
    resident = opt.state[params[0]]["exp_avg"]
    assert resident.untyped_storage().data_ptr() != a["state"][0]["exp_avg"].untyped_storage().data_ptr()
    load_optimizer_state(opt, b)  # same layout: copied into the same tensors
    assert opt.state[params[0]]["exp_avg"] is resident and torch.equal(resident, b["state"][0]["exp_avg"])
    before = {k: v.clone() for k, v in b["state"][1].items()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # trains on the resident copy: the stored state is untouched
    assert all(torch.equal(b["state"][1][k], v) for k, v in before.items())
    assert float(opt.state[params[1]]["step"]) == 2.0
    load_optimizer_state(opt, torch.optim.AdamW(params).state_dict())  # a fresh client: empty state
    assert not opt.state


def test_pack_into_rewrites_an_exclusive_block_in_place_and_falls_back_otherwise():
    from fedrl_lightning.packing import pack, pack_into

    def state(seed: int, lr: float = 0.1) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {"state": {0: {"m": torch.randn(4, 5, generator=gen), "v": torch.randn(3, generator=gen)}}, "lr": lr}

    block = pack(state(0))
    ptr = block["state"][0]["m"].untyped_storage().data_ptr()
    new = state(1, lr=0.05)
    got = pack_into(new, block)
    assert got["state"][0]["m"].untyped_storage().data_ptr() == ptr  # the same pages, rewritten
    assert torch.equal(got["state"][0]["m"], new["state"][0]["m"]) and torch.equal(
        got["state"][0]["v"], new["state"][0]["v"]
    )
    assert got["lr"] == 0.05  # non-tensor leaves come from the new state
    new["state"][0]["m"].add_(1.0)  # a copy, not the source's tensors
    assert not torch.equal(got["state"][0]["m"], new["state"][0]["m"])

    held = got["state"][0]["m"][:2]  # someone else views the block: it must not change under them
    kept = held.clone()
    fresh = pack_into(state(2), got)
    assert fresh["state"][0]["m"].untyped_storage().data_ptr() != ptr and torch.equal(held, kept)
    del held
    other = pack_into({"state": {0: {"m": torch.randn(5, 4), "v": torch.randn(3)}}, "lr": 0.1}, fresh)
    assert other["state"][0]["m"].untyped_storage().data_ptr() != fresh["state"][0]["m"].untyped_storage().data_ptr()
    assert pack_into(state(3), None)["state"][0]["m"].shape == (4, 5)  # no earlier block: a fresh pack
