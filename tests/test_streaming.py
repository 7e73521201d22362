"""Streaming aggregation: updates folded one at a time give bit for bit what the buffered aggregation gives."""

import copy
import gc
import logging
import weakref

import pytest
import torch

from conftest import make_data, make_module
from fedrl_lightning.aggregation import (
    Buffer,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedYogi,
    Krum,
    RelativeGainWeighting,
    Scaffold,
    TaskAwareFedAvg,
    TrimmedMean,
    WeightedMean,
    weighted_average,
)
from fedrl_lightning.aggregation import rounds as rounds_module
from fedrl_lightning.aggregation.rounds import RoundAggregation, summary
from fedrl_lightning.privacy import DPFedAvg, clip_update
from fedrl_lightning.trainer import FederatedTrainer

SHAPES = {"a.lora_A.default.weight": (4, 6), "a.lora_B.default.weight": (5, 4), "norm.weight": (5,)}

STREAMING = {
    "fedavg-prompts": lambda: FedAvg(),
    "fedavg-tokens": lambda: FedAvg("tokens"),
    "fedavg-uniform": lambda: FedAvg("uniform"),
    "fedprox": lambda: FedProx(mu=0.1),
    "fedavgm": lambda: FedAvgM(server_lr=0.7),
    "fedadam": lambda: FedAdam(eta=1e-2),
    "fedadam-reddi": lambda: FedAdam(eta=1e-2, convention="reddi", bias_correction=True),
    "fedyogi": lambda: FedYogi(),
    "fedadagrad": lambda: FedAdagrad(eta=1e-2),
    "scaffold": lambda: Scaffold(server_lr=0.9, num_clients=8),
    "dp": lambda: DPFedAvg(num_clients=8, noise_multiplier=0.5, clip_norm=0.5, seed=3),
    "dp-adaptive": lambda: DPFedAvg(
        num_clients=8, noise_multiplier=0.5, clip_norm=0.5, adaptive_clipping=True, clipped_count_stddev=1.0
    ),
}


def _state(gen, dtype=torch.float32, scale=1.0):
    return {k: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for k, s in SHAPES.items()}


def _updates(global_state, seed, n=5, weights=None):
    """Client updates near ``global_state`` with different prompt and token counts, made one at a time."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        delta = _state(gen, scale=0.3 * (i + 1))
        state = {k: (v.double() + delta[k].double()).to(v.dtype) for k, v in global_state.items()}
        dc = {k: torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        yield ClientUpdate(
            i,
            state,
            num_samples=1 + 3 * i,
            num_tokens=int(torch.randint(1, 50, (), generator=gen)),
            metrics={"reward": float(i)},
            weight=None if weights is None else weights[i],
            extra={"scaffold_delta_c": dc, "task": "t", "accuracy": 0.5},
        )


def _tensors(obj):
    """The tensors of a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if isinstance(obj, dict):
        return {f"{k}/{p}": t for k, v in obj.items() for p, t in _tensors(v).items()}
    return {}


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _rounds(agg, stream, weights=None, n_rounds=3):
    x = _state(torch.Generator().manual_seed(0))
    for r in range(n_rounds):
        updates = _updates(x, seed=10 + r, weights=weights)
        if stream:
            acc = agg.begin(x)
            assert not isinstance(acc, Buffer)
            for update in updates:
                acc.fold(update)
                del update  # the accumulator must not need it any more
            x = acc.finish()
        else:
            x = agg.aggregate(x, list(updates))
    return x


@pytest.mark.parametrize("name", list(STREAMING))
def test_streaming_equals_buffered_bit_for_bit(name):
    buffered, streamed = STREAMING[name](), STREAMING[name]()
    assert streamed.streaming
    x_buffered, x_streamed = _rounds(buffered, False), _rounds(streamed, True)
    for k, v in x_buffered.items():
        assert x_streamed[k].dtype == v.dtype == torch.float32
        assert torch.equal(x_streamed[k], v), k
    assert _same(buffered.state_dict(), streamed.state_dict())
    assert buffered.metrics() == streamed.metrics()


@pytest.mark.parametrize("weights", [[0.5, 0.0, 2.0, 1.0, 0.25], [0.5, None, 2.0, 1.0, 0.25], [None] + [1.0] * 4])
def test_callback_weights_stream_as_they_are_buffered(weights):
    """Callback weights count only when every update has one: until the end both sums are kept."""
    for make in (FedAvg, FedAdam):
        assert torch.equal(
            _rounds(make(), True, weights)["norm.weight"], _rounds(make(), False, weights)["norm.weight"]
        )


def test_the_mean_divides_once_at_the_end():
    x = _state(torch.Generator().manual_seed(0))
    updates = list(_updates(x, seed=1))
    weights = [float(u.num_samples) for u in updates]
    total = sum(weights)
    by_hand = {k: sum(u.state[k].double() * w for u, w in zip(updates, weights)) / total for k in x}
    out = weighted_average([u.state for u in updates], weights)
    assert all(torch.equal(out[k], by_hand[k].float()) for k in x)


def test_dp_streaming_sums_clipped_deltas_in_client_order():
    x = _state(torch.Generator().manual_seed(0))
    updates = list(_updates(x, seed=2))
    dp = DPFedAvg(num_clients=8, noise_multiplier=0.0, clip_norm=0.5)
    acc = dp.begin(x)
    for u in updates:
        acc.fold(u)
    out = acc.finish()
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in x.items()}
    for u in updates:
        clipped, _ = clip_update({k: u.state[k].double() - x[k].double() for k in x}, 0.5)
        for k in x:
            total[k] += clipped[k]
    assert all(torch.equal(out[k], (x[k].double() + total[k] / len(updates)).float()) for k in x)


def test_an_unfinished_round_changes_nothing_and_errors_match():
    x = _state(torch.Generator().manual_seed(0))
    for make in (FedAvgM, FedAdam, lambda: Scaffold(num_clients=8), lambda: DPFedAvg(8, seed=1)):
        agg = make()
        agg.aggregate(x, list(_updates(x, seed=3)))  # some server state
        before = copy.deepcopy(agg.state_dict())
        acc = agg.begin(x)
        for u in _updates(x, seed=4):
            acc.fold(u)
        del acc  # a retried round drops its accumulator
        assert _same(agg.state_dict(), before) and str(agg.state_dict()) == str(before)
    bad = ClientUpdate(9, {"other": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="different keys"):
        acc = FedAvgM().begin(x)
        acc.fold(bad)
    with pytest.raises(ValueError, match="sum to > 0"):
        acc = FedAvg().begin(x)
        acc.fold(ClientUpdate(0, x, 0))
        acc.finish()
    with pytest.raises(ValueError, match="finite and >= 0"):
        acc = FedAvg().begin(x)
        for u in _updates(x, seed=5, n=2, weights=[1.0, -1.0]):
            acc.fold(u)
        acc.finish()
    assert FedAvg().begin(x).finish() is x  # no update: the global state as it was


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(lora_mode="product"),
        lambda: FedAdam(lora_mode="product"),
        TaskAwareFedAvg,
        RelativeGainWeighting,
        FedMedian,
        TrimmedMean,
        lambda: Krum(num_malicious=1),
    ],
)
def test_the_others_buffer_and_say_so(make, caplog, monkeypatch):
    agg = make()
    assert not agg.streaming and isinstance(agg.begin({}), Buffer)
    monkeypatch.setattr(rounds_module, "_said", set())
    with caplog.at_level(logging.INFO, logger=rounds_module.__name__):
        RoundAggregation(agg, {})
        RoundAggregation(agg, {})
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "buffers every client update" in said[0]


def test_a_subclass_with_its_own_aggregate_buffers_until_it_says_otherwise():
    class Custom(FedAvg):
        def aggregate(self, global_state, updates):
            return super().aggregate(global_state, updates)

    class Declared(FedAvg):
        _streams = True  # in the class that defines the aggregate: it vouches that its accumulator folds the same

        def aggregate(self, global_state, updates):
            return super().aggregate(global_state, updates)

    assert FedAvg().streaming and not Custom().streaming and Declared().streaming


def test_round_keeps_summaries_and_a_hook_that_wants_every_update_makes_it_buffer(caplog, monkeypatch):
    x = _state(torch.Generator().manual_seed(0))
    update = next(_updates(x, seed=6))
    kept = summary(update)
    assert kept.state == {} and set(kept.extra) == {"task", "accuracy"} and kept.metrics is update.metrics
    assert update.state and "scaffold_delta_c" in update.extra  # the update itself is untouched

    class Hook:
        def on_before_aggregate(self, updates): ...

    class Quiet:  # the base Callback's no-op and other hooks do not count
        def on_client_end(self, update): ...

    from fedrl_lightning.callbacks import Callback

    monkeypatch.setattr(rounds_module, "_said", set())
    with caplog.at_level(logging.INFO, logger=rounds_module.__name__):
        assert RoundAggregation(FedAvg(), x, [Quiet(), Callback()]).streaming
        buffered = RoundAggregation(FedAvg(), x, [Hook()])
    assert not buffered.streaming and isinstance(buffered.accumulator, Buffer)
    assert buffered.add(update) is update
    assert any("Hook implement(s) on_before_aggregate" in r.getMessage() for r in caplog.records)


# -- through the trainer ---------------------------------------------------------------------------------------


class SpyFedAvg(FedAvg):
    """FedAvg that records the accumulators it hands out (``begin`` is called only when the round streams)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulators = []

    def begin(self, global_state):
        acc = super().begin(global_state)
        self.accumulators.append(type(acc))
        return acc


class Freed:
    """Checks, as each client ends, that the previous client's update is gone (folded and dropped)."""

    def __init__(self):
        self.previous, self.alive_at_next = None, []

    def on_client_end(self, update):
        if self.previous is not None:
            gc.collect()
            self.alive_at_next.append(self.previous() is not None)
        self.previous = weakref.ref(next(iter(update.state.values())))


class Weigh:
    """Different weights for the clients (the tiny model's clients train equal prompts and tokens)."""

    def on_client_end(self, update):
        update.weight = 1.0 + 0.75 * update.client_id


class WantsEveryUpdate:
    def on_before_aggregate(self, updates):
        self.updates = list(updates)
        self.states = [u.state for u in updates]


def _fit(tmp_path, name, aggregation, callbacks):
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=aggregation,
        callbacks=callbacks,
        output_dir=str(tmp_path / name),
        progress=False,
        eval_every=0,
        eval_before_training=False,
        eval_batch_size=4,
    )
    trainer.fit(make_module(), make_data(num_clients=4, partition="iid"), ckpt_path=None)
    return trainer


def test_a_streaming_run_gives_the_buffered_runs_global_adapter(tmp_path):
    freed, hook = Freed(), WantsEveryUpdate()
    streamed = _fit(tmp_path, "streamed", SpyFedAvg(), [Weigh(), freed])
    buffered = _fit(tmp_path, "buffered", SpyFedAvg(), [Weigh(), hook])
    assert streamed.aggregation.accumulators == [WeightedMean] * 2  # both rounds streamed
    assert buffered.aggregation.accumulators == []  # the hook made both rounds buffer
    assert len(hook.states) == 4 and all(hook.states)  # and it received every update with its tensors
    assert freed.alive_at_next and not any(freed.alive_at_next)  # one update held at a time
    assert [u.weight for u in hook.updates] == [1.0, 1.75, 2.5, 3.25]
    for k, v in buffered.global_state.items():
        assert torch.equal(streamed.global_state[k], v), k
    assert [r["train/reward_mean"] for r in streamed.history] == [r["train/reward_mean"] for r in buffered.history]
