"""Federated PPO in the trainer: the peer-mixture reference on the module, the sync, the bytes of each exchange mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import make_data, make_module
from fedrl_lightning.algorithms.fedppo.mixture import MixtureReference, mixture_log_probs
from fedrl_lightning.algorithms.fedppo.reference import PeerMixtureReference
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.client_state import ClientState
from fedrl_lightning.comm import Channel
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.trainer import FederatedTrainer

T = 0.7


@pytest.fixture(scope="module")
def module() -> PPOModule:
    return make_module(PPOModule, num_generations=2, kl_coef=0.1, num_iterations=1, temperature=T)


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


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_module_reference_is_the_mixture_of_three_snapshots_and_restores_the_live_adapter(module, space):
    base = module.trainable_state()
    snapshots = [_perturbed(base, s) for s in range(3)]
    live = _perturbed(base, 10)
    seqs = _sequences(module)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = mixture_log_probs(_snapshot_logits(module, snapshots, seqs), w, seqs[2], space, temperature=T)
    module.load_trainable_state(live)
    module.reference_policy = MixtureReference(snapshots, w, space)
    try:
        got = module.reference_log_probs(*seqs, temperature=T)
    finally:
        module.reference_policy = None
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(module.trainable_state()[k], v) for k, v in live.items())
    # and it is not the base model's reference (adapter disabled)
    assert not torch.allclose(got, module.reference_log_probs(*seqs, temperature=T), atol=1e-4)


def _fake_trainer(module: PPOModule, n: int, aggregation=None) -> SimpleNamespace:
    return SimpleNamespace(
        comm=Channel(),
        aggregation=aggregation,
        num_rounds=3,
        local_steps=2,
        module=module,
        global_state=module.trainable_state(),
        data=SimpleNamespace(client_ids=lambda: list(range(n))),
    )


def _sync(cb: PeerMixtureReference, trainer, module, r: int, adapters: dict[int, dict], scores=None) -> None:
    """Round ``r``: every client starts, ends with ``adapters[cid]`` and score, then the sync."""
    cb.on_round_start()
    for cid, adapter in adapters.items():
        cb.on_client_start(trainer, r, cid, module)
        metrics = {"objective/scores": (scores or {}).get(cid, 0.0)}
        cb.on_client_end(trainer, r, cid, SimpleNamespace(state=adapter, metrics=metrics))
    cb.on_round_end(trainer, r)


def _row(trainer, r: int, cid: int, direction: str) -> dict:
    rows = [x for x in trainer.comm.ledger() if (x["round"], x["client"], x["direction"]) == (r, cid, direction)]
    return rows[0] if rows else {"bytes": 0, "tensor_bytes": 0}


def test_self_preference_one_is_the_clients_own_snapshot_and_downloads_nothing(module):
    base = module.trainable_state()
    trainer = _fake_trainer(module, 3)
    cb = PeerMixtureReference(self_preference=1.0)
    cb.on_fit_start(trainer, module)
    adapters = {c: _perturbed(base, c) for c in range(3)}
    _sync(cb, trainer, module, 1, adapters)
    cb.on_client_start(trainer, 2, 1, module)
    seqs = _sequences(module)
    got = module.reference_log_probs(*seqs, temperature=T)
    own = _snapshot_logits(module, [adapters[1]], seqs)[0]
    torch.testing.assert_close(got, torch.log_softmax(own / T, -1).gather(-1, seqs[2].unsqueeze(-1)).squeeze(-1))
    assert _row(trainer, 2, 1, "down")["bytes"] == 0


def test_snapshot_exchange_bytes_match_the_adapter_size(module):
    base = module.trainable_state()
    adapter_bytes = sum(v.numel() * v.element_size() for v in base.values())
    trainer = _fake_trainer(module, 3)
    cb = PeerMixtureReference(weighting="product", self_preference=0.5)
    cb.on_fit_start(trainer, module)
    _sync(cb, trainer, module, 1, {c: _perturbed(base, c) for c in range(3)}, scores={0: 1.0, 1: 0.0, 2: 2.0})
    for c in range(3):  # round 1: the initial adapter is everyone's already; each publishes its snapshot once
        assert _row(trainer, 1, c, "down")["tensor_bytes"] == 0
        assert _row(trainer, 1, c, "up")["tensor_bytes"] == adapter_bytes
        assert _row(trainer, 1, c, "down")["bytes"] == 4 * 3  # the peers' scores: 3 floats
    cb.on_client_start(trainer, 2, 0, module)
    assert _row(trainer, 2, 0, "down")["tensor_bytes"] == 2 * adapter_bytes  # the two peers' new snapshots
    cb.on_client_start(trainer, 2, 0, module)  # already held: nothing more
    assert _row(trainer, 2, 0, "down")["tensor_bytes"] == 2 * adapter_bytes
    # score 2 > 1 > 0 (S = mean score x 2 local steps), weighted with α = 0.5 for client 0 and renormalised
    w = cb.weights([0, 1, 2], 0, 0.5)
    s = torch.softmax(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64), 0)
    u = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(w, u * s / (u * s).sum())


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("bfloat16", 2)])
def test_logit_exchange_bytes_match_sequences_up_and_logits_down(module, dtype, size):
    base = module.trainable_state()
    trainer = _fake_trainer(module, 3)
    cb = PeerMixtureReference(exchange="logit_exchange", logit_dtype=dtype)
    cb.on_fit_start(trainer, module)
    _sync(cb, trainer, module, 1, {c: _perturbed(base, c) for c in range(3)})
    assert trainer.comm.totals() == {"down": 0, "up": 0}  # snapshots never leave their owners
    b, p, c = 2, 5, 3
    seqs = _sequences(module, b, p, c)
    vocab = module.model.get_base_model().config.vocab_size
    cb.on_client_start(trainer, 2, 0, module)
    got = module.reference_log_probs(*seqs, temperature=T)
    peers = 2  # the client's own snapshot is computed where it lives
    assert _row(trainer, 2, 0, "up")["tensor_bytes"] == peers * (2 * b * p + 2 * b * c) * 8  # int64 ids and masks
    assert _row(trainer, 2, 0, "down")["tensor_bytes"] == peers * b * c * vocab * size
    # float32 on the wire: exactly the reference that snapshot exchange computes locally
    local = PeerMixtureReference()
    local.load_state_dict(cb.state_dict())
    local.on_client_start(_fake_trainer(module, 3), 2, 0, module)
    expected = module.reference_log_probs(*seqs, temperature=T)
    if dtype == "float32":
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0.1)
    module.reference_policy = None


def _run(tmp_path, name: str, callbacks, aggregation=None, rounds: int = 2) -> FederatedTrainer:
    trainer = FederatedTrainer(
        num_rounds=rounds,
        aggregation=aggregation,
        callbacks=callbacks,
        eval_every=0,
        output_dir=str(tmp_path / name),
        progress=False,
    )
    module = make_module(PPOModule, num_generations=2, kl_coef=0.5, num_iterations=1, temperature=T)
    trainer.fit(module, make_data(num_clients=3, tasks=["basic_arithmetic", "leg_counting", "letter_counting"]))
    return trainer


def test_mixture_changes_training_only_after_the_first_sync(tmp_path):
    isolated = _run(tmp_path, "isolated", [PeerMixtureReference(self_preference=1.0)])
    mixed = _run(tmp_path, "mixed", [PeerMixtureReference(self_preference=0.2)])
    r1 = [{k: v for k, v in h.items() if "objective/kl" in k} for h in (isolated.history[1], mixed.history[1])]
    r2 = [{k: v for k, v in h.items() if "objective/kl" in k} for h in (isolated.history[2], mixed.history[2])]
    # round 1: every snapshot is the initial adapter, so both references are the same model
    assert r1[0] == pytest.approx(r1[1], abs=1e-6)
    assert r2[0] != pytest.approx(r2[1], abs=1e-6)
    assert mixed.history[2]["client0/peers/weight_self"] == pytest.approx(0.2)
    # round 2 downloaded two peers' snapshots per client; isolated clients only published theirs
    assert mixed.comm.totals(2)["down"] > 0 and isolated.comm.totals(2)["down"] == 0
    assert isinstance(mixed.client_states[0], ClientState) and mixed.client_states[0].adapter is not None


def test_fedavg_mode_references_the_synced_global_model(tmp_path):
    from fedrl_lightning.aggregation import FedAvg

    synced = _run(tmp_path, "synced", [PeerMixtureReference()], aggregation=FedAvg())
    base = _run(tmp_path, "base", [], aggregation=FedAvg())
    # round 2 starts from the averaged adapter: one local step samples from exactly the reference, so KL = 0;
    # with the base model as the reference (no callback) it is not
    assert synced.history[2]["client0/objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(base.history[2]["client0/objective/kl"]) > 1e-4


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
