"""Our GRPO loss against TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same log-probs.

TRL is no dependency of the project: ``make bench-trl`` installs it into ``.venv-trl``, which this module appends to
``sys.path`` when it exists (what ``PYTHONPATH=.venv-trl`` does for ``benchmarks/vs_trl.py``); without it every test
here skips. TRL's method runs unchanged on a stand-in ``self`` whose ``_get_per_token_logps_and_entropies`` returns
the given log-probs, so everything after the model's forward pass is TRL's code: ratio, clipping, the k3 KL and its
bias correction, the vLLM importance weights, the ``loss_type`` normalisation. Ours is ``GRPOModule.policy_loss`` on
the same tensors. Both run the same float32 operations in the same order, so loss and gradient agree to rounding.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_module
from fedrl_lightning.losses import LOSS_TYPES
from fedrl_lightning.modules import GRPOModule
from fedrl_lightning.modules.grpo import GRPOBatch
from fedrl_lightning.rollout import Rollout

TRL_DIR = Path(__file__).resolve().parent.parent / ".venv-trl"
if TRL_DIR.is_dir() and str(TRL_DIR) not in sys.path:
    sys.path.append(str(TRL_DIR))  # appended: the project's own packages still win
with warnings.catch_warnings():  # TRL warns about the vLLM version it finds
    warnings.simplefilter("ignore")
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL not installed (`make bench-trl`)")
    grpo_config = pytest.importorskip("trl.trainer.grpo_config")

N, T, MAX_LEN, ACCUMULATION = 4, 6, 8, 2  # MAX_LEN > T: dr_grpo must use the configured length, not T


class TRLStandIn:
    """What ``_compute_loss`` reads of a ``GRPOTrainer``: one process, training, no entropy/aux/off-policy extras."""

    _compute_loss = grpo_trainer.GRPOTrainer._compute_loss

    def __init__(self, log_probs: torch.Tensor, loss_type: str, beta: float, correction: bool, vllm: bool) -> None:
        self.log_probs = log_probs
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low = self.epsilon_high = 0.2
        self.args = SimpleNamespace(use_bias_correction_kl=correction, delta=None, steps_per_generation=ACCUMULATION)
        self.use_vllm = self.vllm_importance_sampling_correction = vllm
        self.importance_sampling_level = "token"
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.max_completion_length = MAX_LEN
        self.current_gradient_accumulation_steps = ACCUMULATION
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model: object, *args: object, **kwargs: object) -> tuple:
        return self.log_probs, torch.zeros_like(self.log_probs), None


@pytest.fixture(scope="module")
def module() -> GRPOModule:
    module = make_module()
    module.sampling = replace(module.sampling, max_completion_length=MAX_LEN)
    return module


def inputs(off_policy: bool, vllm: bool) -> dict[str, torch.Tensor | None]:
    """Seeded log-probs (policy, old, reference, sampler), advantages and a mask with one short and one empty row."""
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(N, T, 11, generator=gen), -1)[..., 0]
    old = log_probs + 0.3 * torch.randn(N, T, generator=gen) if off_policy else None
    behaviour = log_probs if old is None else old
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2] = 0
    return {
        "log_probs": log_probs,
        "old": old,
        "ref": log_probs + 0.5 * torch.randn(N, T, generator=gen),
        "sampled": behaviour + 0.2 * torch.randn(N, T, generator=gen) if vllm else None,
        "advantages": torch.randn(N, generator=gen),
        "mask": mask,
    }


def test_use_bias_correction_kl_defaults_as_in_trl():
    trl_default = grpo_config.GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default
    assert inspect.signature(GRPOModule).parameters["use_bias_correction_kl"].default is trl_default is True


@pytest.mark.parametrize("vllm", [False, True], ids=["hf", "vllm_is"])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("correction", [True, False], ids=["bias_corrected_kl", "plain_kl"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_equal_trls(module, loss_type, beta, correction, off_policy, vllm):
    x = inputs(off_policy, vllm)
    mask = x["mask"]
    module.loss_type, module.beta, module.use_bias_correction_kl = loss_type, beta, correction

    ours_lp = x["log_probs"].clone().requires_grad_(True)
    rollout = Rollout(mask, mask, mask, mask, torch.zeros(N, dtype=torch.bool), [""] * N, x["sampled"])
    ref = x["ref"] if beta else None
    batch = GRPOBatch(rollout, x["advantages"], mask, x["old"], ref, float(mask.sum()), ACCUMULATION)
    old = x["old"] if x["old"] is not None else ours_lp.detach()
    ours = module.policy_loss(batch, ours_lp, old, x["advantages"], log=False)
    (ours_grad,) = torch.autograd.grad(ours, ours_lp)

    trl_lp = x["log_probs"].clone().requires_grad_(True)
    trl_inputs = {
        "prompt_ids": mask,
        "prompt_mask": mask,
        "completion_ids": mask,
        "completion_mask": mask,
        "advantages": x["advantages"],
        "old_per_token_logps": x["old"],
        "ref_per_token_logps": x["ref"],
        "num_items_in_batch": mask.sum(),
    }
    if vllm:  # TRL computes these weights while generating; the loss only multiplies them in
        trl_inputs["importance_sampling_ratio"] = module.importance_weights(old, x["sampled"], mask, log=False)
    trl = TRLStandIn(trl_lp, loss_type, beta, correction, vllm)._compute_loss(None, trl_inputs)
    (trl_grad,) = torch.autograd.grad(trl, trl_lp)

    assert abs(float(ours) - float(trl)) <= 1e-6, (float(ours), float(trl))
    torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-6, atol=1e-8)
    assert float(trl_grad.abs().max()) > 1e-3  # a gradient that checks something
