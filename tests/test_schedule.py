"""Learning-rate schedules equal transformers' (TRL's ``lr_scheduler_type``/``warmup_ratio``), and TRL's
``gradient_accumulation_steps`` sets the micro-batch size."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from conftest import make_data, make_module
from fedrl_lightning.aggregation import FedAvg
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.modules.pg import resolve_micro_batch_size
from fedrl_lightning.schedule import SCHEDULES, lr_factor
from fedrl_lightning.trainer import FederatedTrainer


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.3])
def test_lr_factor_equals_transformers_scheduler(kind: str, warmup_ratio: float) -> None:
    total = 17
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = transformers.get_scheduler(
        kind, optimizer, num_warmup_steps=math.ceil(total * warmup_ratio), num_training_steps=total
    )
    for step in range(total):
        assert lr_factor(kind, step, total, warmup_ratio) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_lr_factor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        lr_factor("cosin", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        lr_factor("linear", 0, 10, 1.5)


def test_gradient_accumulation_steps_sets_the_micro_batch() -> None:
    assert resolve_micro_batch_size(None, None, 32) == 16
    assert resolve_micro_batch_size(8, None, 32) == 8
    assert resolve_micro_batch_size(None, 4, 32) == 8
    assert resolve_micro_batch_size(8, 4, 32) == 8
    with pytest.raises(ValueError, match="divide"):
        resolve_micro_batch_size(None, 3, 32)
    with pytest.raises(ValueError, match="disagree"):
        resolve_micro_batch_size(4, 4, 32)


class _LearningRates(Callback):
    """Records the optimizer's rate at each local step; stops the run (as Ctrl-C would) at ``stop_round``."""

    def __init__(self, stop_round: int | None = None) -> None:
        self.rates: list[tuple[int, int, float]] = []
        self.stop_round = stop_round

    def on_round_start(self, round_idx: int, **kwargs) -> None:
        if round_idx == self.stop_round:
            raise KeyboardInterrupt

    def on_local_step_end(self, client, round_idx: int, step: int, **kwargs) -> None:
        self.rates.append((round_idx, step, client.optimizer.param_groups[0]["lr"]))


def _run(out, callback: _LearningRates, ckpt_path: str | None) -> FederatedTrainer:
    module = make_module(lr_scheduler_type="linear", warmup_ratio=0.25)
    trainer = FederatedTrainer(
        num_rounds=3,
        local_steps=2,
        aggregation=FedAvg(),
        output_dir=str(out),
        progress=False,
        callbacks=[callback],
        eval_before_training=False,
    )
    trainer.fit(module, make_data(), ckpt_path=ckpt_path)
    return trainer


def test_the_schedule_follows_the_run_s_rounds_and_resumes_exactly(tmp_path):
    straight = _LearningRates()
    expected = _run(tmp_path / "straight", straight, None)
    # Rate of local step s in round r: the run's step (r - 1) * 2 + s of 3 * 2, for each of the 2 clients.
    want = [
        (r, s, 1e-2 * lr_factor("linear", (r - 1) * 2 + s, 6, 0.25)) for r in (1, 2, 3) for _ in (0, 1) for s in (0, 1)
    ]
    assert [(r, s) for r, s, _ in straight.rates] == [(r, s) for r, s, _ in want]
    assert [lr for *_, lr in straight.rates] == pytest.approx([lr for *_, lr in want], abs=1e-15)
    assert straight.rates[0][2] == 0.0 and straight.rates[1][2] == 0.5e-2  # warmup: 0, then half

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", _LearningRates(stop_round=3), None)
    resumed = _LearningRates()
    trainer = _run(tmp_path / "resumed", resumed, "last")
    assert [lr for *_, lr in resumed.rates] == [lr for r, _, lr in straight.rates if r == 3]
    assert all(torch.equal(expected.global_state[k], v) for k, v in trainer.global_state.items())
