"""Federated PPO: the module's peer-mixture reference, the PeerMixture aggregator's messages and bytes, whole runs."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import make_data, make_module
from fedrl_lightning.aggregation import ClientUpdate, FedAvg
from fedrl_lightning.algorithms.fedppo import PeerMixture, PeerReference
from fedrl_lightning.algorithms.fedppo.mixture import mixture_log_probs
from fedrl_lightning.algorithms.fedppo.peers import mixture_message, read_mixture
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.client_state import ClientState
from fedrl_lightning.comm import Channel
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.trainer import FederatedTrainer

T = 0.7


def _module(space: str = "logits", **overrides) -> PPOModule:
    kwargs = dict(num_generations=2, kl_coef=0.1, num_iterations=1, temperature=T, peer_reference=PeerReference(space))
    return make_module(PPOModule, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def module() -> PPOModule:
    return _module()


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _sequences(module: PPOModule, b: int = 2, p: int = 5, c: int = 3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    vocab = module.model.get_base_model().config.vocab_size
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones(b, c, dtype=torch.long)
    return (
        torch.randint(0, vocab, (b, p), generator=gen),
        prompt_mask,
        torch.randint(0, vocab, (b, c), generator=gen),
        completion_mask,
    )


def _snapshot_logits(module: PPOModule, snapshots: list[dict], seqs: tuple) -> torch.Tensor:
    logits = []
    with torch.no_grad():
        for snap in snapshots:
            module.load_trainable_state(snap)
            logits.append(module.completion_logits(*seqs))
    return torch.stack(logits)


def _adapter_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _update(cid: int, state: dict[str, torch.Tensor], score: float = 0.0) -> ClientUpdate:
    return ClientUpdate(cid, state, num_samples=1, metrics={"objective/scores": score})


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_module_reference_is_the_mixture_of_three_snapshots_and_restores_the_live_adapter(space):
    module = _module(space)
    base = module.trainable_state()
    snapshots = [_perturbed(base, s) for s in range(3)]
    live = _perturbed(base, 10)
    seqs = _sequences(module)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = mixture_log_probs(_snapshot_logits(module, snapshots, seqs), w, seqs[2], space, temperature=T)
    module.load_trainable_state(snapshots[0])  # the round starts from the client's own snapshot
    module.begin_round(mixture_message(0.5, [1, 2], [0.3, 0.2], snapshots[1:]))
    module.load_trainable_state(live)  # then trains
    got = module.reference_log_probs(*seqs, temperature=T)
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(module.trainable_state()[k], v) for k, v in live.items())
    logged = module.tracker.compute_and_reset()
    assert logged["peers/weight_self"] == pytest.approx(0.5) and logged["peers/weight_client2"] == pytest.approx(0.2)
    module.end_round()  # after the round: the base model's reference (adapter disabled) again
    assert not torch.allclose(got, module.reference_log_probs(*seqs, temperature=T), atol=1e-4)


def test_self_preference_one_is_the_clients_own_snapshot_and_downloads_nothing(module):
    base = module.trainable_state()
    mixture = PeerMixture(self_preference=1.0)
    adapters = {c: _perturbed(base, c) for c in range(3)}
    mixture.aggregate(base, [_update(c, a) for c, a in adapters.items()])
    assert mixture.client_downlink(1, 2, 3) == {}
    module.load_trainable_state(adapters[1])
    module.begin_round({})
    seqs = _sequences(module)
    got = module.reference_log_probs(*seqs, temperature=T)
    module.end_round()
    own = _snapshot_logits(module, [adapters[1]], seqs)[0]
    torch.testing.assert_close(got, torch.log_softmax(own / T, -1).gather(-1, seqs[2].unsqueeze(-1)).squeeze(-1))


def test_snapshot_bytes_match_the_adapter_size_times_the_mixed_peers(module):
    base = module.trainable_state()
    mixture = PeerMixture(weighting="product", self_preference=0.5)
    assert mixture.client_downlink(0, 1, 3) == {}  # before the first sync no peer has a snapshot: nothing to send
    adapters = {c: _perturbed(base, c) for c in range(3)}
    mixture.aggregate(base, [_update(c, adapters[c], score) for c, score in ((0, 1.0), (1, 0.0), (2, 2.0))])
    comm = Channel()
    received = comm.send_down(2, 0, mixture.client_downlink(0, 2, 3))
    (row,) = comm.ledger()
    # two peers' snapshots, their ids (int64) and the three weights (float64, its own first)
    assert row["tensor_bytes"] == 2 * _adapter_bytes(base) + 2 * 8 + 3 * 8
    weights, peers, snapshots = read_mixture(received)
    assert peers == [1, 2] and all(torch.equal(snapshots[1][k], v) for k, v in adapters[2].items())
    # α = 0.5 for client 0, times softmax of the scores (1, 0, 2), renormalised
    u = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    s = torch.softmax(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(weights, u * s / (u * s).sum())
    assert mixture.aggregate(base, []) is base  # the global state never changes


def test_self_preference_is_scheduled_linearly_over_the_rounds():
    mixture = PeerMixture(self_preference=1.0, self_preference_end=0.0)
    assert [mixture.alpha(r, 3) for r in (1, 2, 3)] == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="self_preference_end"):
        PeerMixture(self_preference_end=0.5)


def _run(tmp_path, name: str, aggregation, peer_reference: bool = True, rounds: int = 2, clients: int = 3, **kw):
    trainer = FederatedTrainer(
        num_rounds=rounds,
        aggregation=aggregation,
        eval_every=0,
        eval_batch_size=4,
        output_dir=str(tmp_path / name),
        progress=False,
        **kw,
    )
    module = _module(kl_coef=0.5, peer_reference=PeerReference() if peer_reference else None)
    tasks = ["basic_arithmetic", "leg_counting", "letter_counting"][:clients]
    trainer.fit(module, make_data(num_clients=clients, tasks=tasks))
    return trainer


def _row(trainer, r: int, cid: int, direction: str) -> dict:
    rows = [x for x in trainer.comm.ledger() if (x["round"], x["client"], x["direction"]) == (r, cid, direction)]
    return rows[0] if rows else {"bytes": 0, "tensor_bytes": 0}


def test_mixture_changes_training_only_after_the_first_sync(tmp_path):
    isolated = _run(tmp_path, "isolated", PeerMixture(self_preference=1.0))
    mixed = _run(tmp_path, "mixed", PeerMixture(self_preference=0.2))
    r1 = [{k: v for k, v in h.items() if "objective/kl" in k} for h in (isolated.history[1], mixed.history[1])]
    r2 = [{k: v for k, v in h.items() if "objective/kl" in k} for h in (isolated.history[2], mixed.history[2])]
    # round 1: nobody has published yet, so every reference is the client's own start adapter
    assert r1[0] == pytest.approx(r1[1], abs=1e-6)
    assert r2[0] != pytest.approx(r2[1], abs=1e-6)
    assert mixed.history[2]["client0/peers/weight_self"] == pytest.approx(0.2)
    assert mixed.history[2]["client0/peers/weight_client1"] == pytest.approx(0.4)
    adapter = _adapter_bytes(mixed.module.trainable_state())
    for c in range(3):  # each client publishes its adapter every round; from round 2 it downloads its two peers'
        assert _row(mixed, 1, c, "down")["tensor_bytes"] == 0 and _row(isolated, 2, c, "down")["bytes"] == 0
        assert _row(mixed, 2, c, "down")["tensor_bytes"] == 2 * adapter + 2 * 8 + 3 * 8
        assert _row(mixed, 2, c, "up")["tensor_bytes"] == adapter == _row(isolated, 2, c, "up")["tensor_bytes"]
    assert isinstance(mixed.client_states[0], ClientState) and mixed.client_states[0].adapter is not None
    own = mixed.client_states[1].adapter  # the published snapshot is the client's own adapter
    assert all(torch.equal(mixed.server.aggregation.snapshots[1][k], v) for k, v in own.items())
    assert "client0/eval/accuracy" in mixed.history[2]  # evaluated on its own adapter


def test_fedavg_mode_references_the_synced_global_model(tmp_path):
    synced = _run(tmp_path, "synced", FedAvg())
    base = _run(tmp_path, "base", FedAvg(), peer_reference=False)
    # round 2 starts from the averaged adapter: one local step samples from exactly the reference, so KL = 0;
    # with the base model as the reference (no peer_reference) it is not
    assert synced.history[2]["client0/objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(base.history[2]["client0/objective/kl"]) > 1e-4
    assert synced.comm.totals() == base.comm.totals()  # no extra bytes


class FailClient(Callback):
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def on_client_start(self, client_id: int) -> None:
        if client_id == self.client_id:
            raise RuntimeError("disk full on the client")


def test_a_peer_mixture_run_resumes_exactly_and_a_retried_round_publishes_nothing(tmp_path):
    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    full = _run(tmp_path, "full", PeerMixture(self_preference=0.5), clients=2)
    _run(tmp_path, "part", PeerMixture(self_preference=0.5), rounds=1, clients=2)
    resumed = _run(tmp_path, "part", PeerMixture(self_preference=0.5), clients=2)
    assert resumed.round_idx == 2
    for cid in (0, 1):
        assert same(resumed.client_states[cid].adapter, full.client_states[cid].adapter)
        assert same(resumed.server.aggregation.snapshots[cid], full.server.aggregation.snapshots[cid])
    assert resumed.server.aggregation.scores == full.server.aggregation.scores
    row = [{k: v for k, v in t.history[-1].items() if "timing/" not in k} for t in (resumed, full)]
    assert row[0] == row[1]
    # round 3 fails twice (client 1 cannot train, min_clients 2): client 0 trained, but nothing is published
    later = _run(
        tmp_path,
        "part",
        PeerMixture(self_preference=0.5),
        rounds=3,
        clients=2,
        min_clients=2,
        callbacks=[FailClient(1)],
    )
    assert later.round_idx == 2 and "failed 2 time(s)" in later.stopped
    for cid in (0, 1):
        assert same(later.server.aggregation.snapshots[cid], full.server.aggregation.snapshots[cid])
        assert same(later.client_states[cid].adapter, full.client_states[cid].adapter)


@pytest.mark.parametrize("config", ["configs/ppo.yaml", "configs/fedppo.yaml"])
def test_tiny_cli_run(tmp_path, config):
    tiny = {
        "trainer": {"num_rounds": 2, "local_steps": 1, "eval_batch_size": 8, "progress": False},
        "model": {
            "init_args": {
                "model": "tiny-random",
                "lora_r": 4,
                "lora_alpha": 8,
                "num_generations": 2,
                "prompts_per_step": 2,
                "micro_batch_size": 4,
                "max_completion_length": 8,
            }
        },
        "data": {"num_clients": 2, "train_size": 8, "eval_size": 2},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    out = tmp_path / "run"
    FedRLCLI(args=["fit", "-c", config, "-c", str(tmp_path / "tiny.yaml"), "--trainer.output_dir", str(out)])
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "client0/objective/kl" in header and "client1/eval/accuracy" in header
    assert (out / "adapters" / "client0" / "adapter_config.json").is_file()
