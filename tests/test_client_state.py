"""The client-state bank: rows written in place, swaps into live optimizer tensors, checkpoints."""

import pytest
import torch

from fedrl_lightning.client_state import ClientState, ClientStateBank, load_optimizer, optimizer_tensors


def _trained(params: list[torch.nn.Parameter], seed: int) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, lr=0.1)
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


def test_rows_are_written_in_place_and_read_as_views_of_one_buffer():
    bank = ClientStateBank([5, 7])
    a = {"x": torch.randn(2, 3), "n": torch.arange(4), "y": torch.randn(5)}
    bank.write("adapter", 7, a)
    assert bank.read("adapter", 5) is None  # never written
    got = bank.read("adapter", 7)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in a.items())
    floats = {got["x"].untyped_storage().data_ptr(), got["y"].untyped_storage().data_ptr()}
    assert len(floats) == 1  # one float32 buffer for every client's floats
    b = {k: v + 1 for k, v in a.items()}
    bank.write("adapter", 7, b)  # the same pages, rewritten: earlier views see the new values
    assert got["x"].data_ptr() == bank.read("adapter", 7)["x"].data_ptr() and torch.equal(got["x"], b["x"])
    with pytest.raises(ValueError, match="another layout"):
        bank.write("adapter", 5, {"x": torch.randn(3, 2), "n": torch.arange(4), "y": torch.randn(5)})
    with pytest.raises(KeyError, match="client 9"):
        bank.write("adapter", 9, a)


def test_optimizer_swaps_copy_into_the_live_tensors_and_never_alias_the_bank():
    params = _params()
    bank = ClientStateBank([0, 1])
    for cid in (0, 1):
        bank.write("optimizer", cid, optimizer_tensors(_trained(params, seed=cid)))
    opt = torch.optim.AdamW(params, lr=0.1)
    load_optimizer(opt, bank.read("optimizer", 0), None)  # first swap-in: cloned
    live = opt.state[params[0]]["exp_avg"]
    stored = bank.read("optimizer", 0)
    assert live.data_ptr() != stored["0.exp_avg"].data_ptr() and torch.equal(live, stored["0.exp_avg"])
    load_optimizer(opt, bank.read("optimizer", 1), None)  # same layout: copied into the same tensors
    assert opt.state[params[0]]["exp_avg"] is live and torch.equal(live, bank.read("optimizer", 1)["0.exp_avg"])
    before = {k: v.clone() for k, v in bank.read("optimizer", 1).items()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # trains on the live tensors: the stored row is untouched
    assert all(torch.equal(bank.read("optimizer", 1)[k], v) for k, v in before.items())
    assert float(opt.state[params[1]]["step"]) == 2.0
    load_optimizer(opt, None, None)  # a fresh client: empty state, created on its first step
    assert not opt.state


def test_state_dict_restores_all_rows_or_only_some(tmp_path):
    bank = ClientStateBank([0, 1, 2])
    for cid in (0, 1):
        state = ClientState({"position": cid}, torch.tensor([cid], dtype=torch.uint8), extra={"c": cid})
        state.optimizer = {"0.m": torch.full((3,), float(cid))}
        bank.put(cid, state)
    saved = bank.state_dict()
    torch.save(saved, tmp_path / "bank.pt")
    loaded = torch.load(tmp_path / "bank.pt", weights_only=False)
    bank.write("optimizer", 0, {"0.m": torch.full((3,), 9.0)})
    bank.forget([1])
    assert 1 not in bank and bank.get(1) is None
    bank.load_state_dict(loaded, only=[1, 2])  # client 0 keeps its newer row
    assert float(bank.read("optimizer", 0)["0.m"][0]) == 9.0
    assert bank.get(1).extra == {"c": 1} and float(bank.get(1).optimizer["0.m"][0]) == 1.0
    assert 2 not in bank
    other = ClientStateBank([0, 1, 2])
    other.load_state_dict(loaded)
    assert float(other.read("optimizer", 0)["0.m"][0]) == 0.0 and other.get(0).sampler == {"position": 0}
    with pytest.raises(ValueError, match=r"clients \[0, 1, 2\]"):
        ClientStateBank([5]).load_state_dict(loaded)


def test_a_bank_larger_than_ram_fails_with_a_hint(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    bank = ClientStateBank(range(1000))
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(ValueError, match=r"1000 clients.*trainer.client_state_dir"):
        bank.write("adapter", 0, {"w": torch.ones(4)})
