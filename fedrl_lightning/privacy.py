"""Central differential privacy for parameter federation: DP-FedAvg with fixed or adaptive clipping and RDP accounting.

The guarantee is user-level (client-level) DP of the released global adapters against anyone who sees them, with a
trusted server: the server sees the raw client updates, clips each client's delta, averages and adds Gaussian noise
(McMahan et al. 2018, "Learning differentially private recurrent language models"). Adaptive clipping follows
Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping". The privacy loss is tracked with the RDP
accountant of the subsampled Gaussian mechanism from ``opacus``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedrl_lightning.aggregation import Accumulator, Aggregator, ClientUpdate
from fedrl_lightning.errors import StopFederation

__all__ = [
    "ClippedSum",
    "DPFedAvg",
    "PrivacyAccountant",
    "PrivacyBudgetExhausted",
    "add_gaussian_noise",
    "clip_update",
    "update_norm",
]


class PrivacyBudgetExhausted(StopFederation):
    """Raised before a release that would push the privacy loss epsilon above the target."""


def update_norm(delta: dict[str, Tensor]) -> float:
    """Global L2 norm of an update: sqrt of the sum of squares over all of its tensors (accumulated in float64).

    Args:
        delta: the update, tensor by tensor.
    """
    total = torch.zeros((), dtype=torch.float64)
    for t in delta.values():
        total += t.detach().to("cpu", torch.float64).square().sum()
    return math.sqrt(float(total))


def clip_update(delta: dict[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], bool]:
    """Scale an update by ``min(1, clip_norm / ||delta||)`` so its global L2 norm is at most ``clip_norm``.

    Args:
        delta: the update, tensor by tensor.
        clip_norm: the largest global L2 norm allowed (> 0).

    Returns:
        The clipped update (a new dict) and whether it was scaled down (norm strictly above ``clip_norm``).
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(delta)
    if norm <= clip_norm:
        return dict(delta), False
    scale = clip_norm / norm
    return {name: t * scale for name, t in delta.items()}, True


def add_gaussian_noise(state: dict[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Add i.i.d. N(0, std^2) noise to every floating-point tensor (others are kept as they are).

    Noise is drawn on the generator's device, in float64 for float64 tensors and float32 otherwise, in the dict's
    order, so a seeded generator gives the same noise on every run.

    Args:
        state: the tensors to perturb.
        std: the noise standard deviation (>= 0; 0 returns the tensors unchanged and draws nothing).
        generator: the random generator to draw from.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return dict(state)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        work = torch.float64 if t.dtype == torch.float64 else torch.float32
        noise = torch.randn(t.shape, generator=generator, dtype=work, device=generator.device)
        out[name] = (t.to(work) + std * noise.to(t.device)).to(t.dtype)
    return out


class PrivacyAccountant:
    """RDP accountant of the Poisson-subsampled Gaussian mechanism (wraps ``opacus.accountants.RDPAccountant``).

    The state is the history of ``(noise_multiplier, sample_rate, steps)``, so a resumed run restores it exactly.
    A release with noise multiplier 0 is not private: epsilon is then infinite.
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant  # imported here: opacus is slow to import

        self._rdp = RDPAccountant()
        self._cache: tuple[Any, float] | None = None

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The composed mechanisms as ``(noise_multiplier, sample_rate, steps)``, consecutive equal ones merged."""
        return list(self._rdp.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Compose one more release.

        Args:
            noise_multiplier: noise std divided by the L2 sensitivity of the released sum.
            sample_rate: probability that a given client takes part in the release.
        """
        if noise_multiplier < 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"need noise_multiplier >= 0, 0 < sample_rate <= 1; got {noise_multiplier}, {sample_rate}")
        self._rdp.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    def epsilon(self, delta: float) -> float:
        """The epsilon of the (epsilon, delta)-DP guarantee of everything composed so far (0 before any step).

        Args:
            delta: the delta of the guarantee.
        """
        key = (tuple(self._rdp.history), delta)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if not self._rdp.history:
            eps = 0.0
        elif any(z <= 0 for z, _, _ in self._rdp.history):
            eps = math.inf
        else:
            eps = float(self._rdp.get_epsilon(delta=delta))
        self._cache = (key, eps)
        return eps

    def state_dict(self) -> dict:
        """The history, as plain Python lists."""
        return {"history": [list(h) for h in self._rdp.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history saved by ``state_dict``.

        Args:
            state: what ``state_dict`` returned.
        """
        self._rdp.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
        self._cache = None


class DPFedAvg(Aggregator):
    """Central DP-FedAvg (McMahan et al. 2018), optionally with adaptive clipping (Andrew et al. 2021).

    Each round with m sampled clients: delta_i = client adapter - global adapter; delta_i is clipped to global L2 norm
    C; the clipped deltas are averaged with UNIFORM weights 1/m; Gaussian noise of std ``z_delta * C / m`` is added to
    the mean; new global = global + noised mean. Uniform weights are what bounds one client's influence on the mean by
    C/m, the sensitivity the noise is calibrated to: weights from reported sample or token counts (or a callback's
    ``ClientUpdate.weight``) would let one client's share grow without bound, so they are ignored here.

    Adaptive clipping tracks the ``target_quantile`` gamma of the clients' update norms. With
    b = (#{i: ||delta_i|| <= C} + N(0, sigma_b^2)) / m, the fraction of UNCLIPPED updates (noised when DP is on), the
    clip moves geometrically: C <- C * exp(-clip_learning_rate * (b - gamma)). This is a gradient step on the quantile
    (pinball) loss l(C; x) = (1 - gamma)(C - x) for x <= C and gamma (x - C) otherwise, whose derivative in C averages
    to b - gamma; so C shrinks when more than gamma of the updates are under it, grows when fewer are, and its fixed
    point b = gamma is stable. (Flower's implementation plugs the CLIPPED fraction into the same formula, which makes
    that fixed point repelling: C collapses when every update is clipped.) Releasing b costs privacy too; by Andrew et
    al. Theorem 1 the two releases together equal one Gaussian release with noise multiplier z when the mean gets
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), which needs sigma_b > z / 2.

    Accounting composes one subsampled-Gaussian release of noise multiplier z and rate q = m / num_clients per round.
    It assumes Poisson sampling of clients; sampling a fixed number m and dividing by it is the usual approximation
    (as in McMahan et al. and Andrew et al.). When ``target_epsilon`` is set, ``aggregate`` checks the epsilon the
    round would bring BEFORE releasing anything and raises ``PrivacyBudgetExhausted`` if it is above the target,
    leaving this aggregator's state untouched: the trainer catches it, checkpoints the last released global adapter
    and stops cleanly.

    It streams (``begin``, ``ClippedSum``): each update is clipped and added to one sum as it arrives; the noise, the
    budget check and every change of this aggregator's state happen in ``finish``.

    Args:
        num_clients: size of the client population, for the sampling rate q = sampled clients / num_clients.
        noise_multiplier: z, the noise std in units of the clip norm on the sum of clipped updates; 0 disables the
            noise (clipping only, no privacy guarantee: epsilon is infinite).
        clip_norm: C, the global L2 norm each client's delta is clipped to (the initial value with adaptive clipping).
        adaptive_clipping: track a quantile of the update norms instead of a fixed C.
        target_quantile: gamma, the fraction of client updates that should end up unclipped.
        clip_learning_rate: eta_C of the geometric clip update.
        clipped_count_stddev: sigma_b, the noise std on the count of unclipped updates; None = m / 20 (Andrew et al.)
            when noise_multiplier > 0, else 0.
        delta: the delta of the reported (epsilon, delta) guarantee; 1e-5 by default, must be below 1 / num_clients.
        target_epsilon: stop (raise ``PrivacyBudgetExhausted``) before a round that would bring epsilon above it.
        seed: seed of this aggregator's own torch.Generator (noise is reproducible and its state is checkpointed).
    """

    def __init__(
        self,
        num_clients: int,
        noise_multiplier: float = 1.0,
        clip_norm: float = 0.1,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        seed: int = 0,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if noise_multiplier < 0 or clip_norm <= 0 or clip_learning_rate < 0:
            raise ValueError("need noise_multiplier >= 0, clip_norm > 0 and clip_learning_rate >= 0")
        if not 0 <= target_quantile <= 1:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
        if clipped_count_stddev is not None and clipped_count_stddev < 0:
            raise ValueError(f"clipped_count_stddev must be >= 0, got {clipped_count_stddev}")
        if not 0 < delta < 1 / num_clients:
            raise ValueError(f"delta must be in (0, 1/num_clients = {1 / num_clients:g}), got {delta}")
        if target_epsilon is not None and (target_epsilon <= 0 or noise_multiplier == 0):
            raise ValueError("target_epsilon needs target_epsilon > 0 and noise_multiplier > 0")
        self.num_clients = num_clients
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.clipped_count_stddev = clipped_count_stddev
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.generator = torch.Generator().manual_seed(seed)
        self.accountant = PrivacyAccountant()
        self.rounds = 0
        self._last = {"dp/clip_norm": clip_norm, "dp/clipped_fraction": 0.0, "dp/noise_std": 0.0}

    def count_stddev(self, num_sampled: int) -> float:
        """sigma_b for a round of ``num_sampled`` clients (0 without adaptive clipping).

        Args:
            num_sampled: m, the clients aggregated this round.
        """
        if not self.adaptive_clipping:
            return 0.0
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return num_sampled / 20 if self.noise_multiplier > 0 else 0.0

    def mean_noise_multiplier(self, num_sampled: int) -> float:
        """z_delta, the noise multiplier of the mean: z, or (z^-2 - (2 sigma_b)^-2)^(-1/2) with adaptive clipping.

        Args:
            num_sampled: m, the clients aggregated this round.
        """
        z = self.noise_multiplier
        if not self.adaptive_clipping or z == 0:
            return z
        sigma_b = self.count_stddev(num_sampled)
        if 2 * sigma_b <= z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier={z} needs clipped_count_stddev > noise_multiplier / 2 = "
                f"{z / 2:g} (Andrew et al. Theorem 1), got {sigma_b:g} with {num_sampled} sampled clients: raise "
                "clipped_count_stddev or sample more clients (the default is num_sampled / 20)"
            )
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5

    @property
    def epsilon(self) -> float:
        """Privacy loss spent so far at ``delta`` (0 before the first round, inf when noise_multiplier is 0)."""
        return self.accountant.epsilon(self.delta)

    def metrics(self) -> dict[str, float]:
        """Per-round DP metrics: epsilon so far, the clip norm used, the fraction of clients clipped, the noise std.

        The clipped fraction is the raw one, a diagnostic for the trusted server, not a privatised release.
        """
        return {"dp/epsilon": self.epsilon, **self._last}

    _streams = True

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        acc = self.accumulator(global_state)
        for update in updates:
            acc.fold(update)
        return acc.finish()

    def accumulator(self, global_state: dict[str, Tensor]) -> ClippedSum:
        """The round's sum of clipped deltas, folded as the updates arrive; ``finish`` checks the budget, adds the
        noise and releases (see ``ClippedSum``)."""
        return ClippedSum(self, global_state)

    def release(self, global_state: dict[str, Tensor], acc: ClippedSum) -> dict[str, Tensor]:
        """The noised mean of the round's clipped deltas added to ``global_state``, the clip and accountant stepped.

        Raises:
            PrivacyBudgetExhausted: the round would bring epsilon above ``target_epsilon`` (nothing released, this
                aggregator unchanged).
        """
        m = acc.count
        if m > self.num_clients:
            raise ValueError(f"{m} updates from a population of num_clients={self.num_clients}")
        q = m / self.num_clients
        z_delta = self.mean_noise_multiplier(m)
        if self.target_epsilon is not None:
            projected = copy.deepcopy(self.accountant)
            projected.step(self.noise_multiplier, q)
            eps = projected.epsilon(self.delta)
            if eps > self.target_epsilon:
                raise PrivacyBudgetExhausted(
                    f"privacy budget exhausted: round {self.rounds + 1} would bring epsilon to {eps:.4g} "
                    f"(delta={self.delta:g}), above target_epsilon={self.target_epsilon:g}; "
                    f"epsilon spent so far: {self.epsilon:.4g} after {self.rounds} rounds"
                )

        clip, names, base, total, num_clipped = acc.clip, acc.names, acc.base, acc.total, acc.num_clipped
        noise_std = z_delta * clip / m
        mean = add_gaussian_noise({name: total[name] / m for name in names}, noise_std, self.generator)
        new_state = dict(global_state)
        for name in names:
            ref = global_state[name]
            new_state[name] = (base[name] + mean[name]).to(device=ref.device, dtype=ref.dtype)

        if self.adaptive_clipping:
            count = float(m - num_clipped)
            sigma_b = self.count_stddev(m)
            if sigma_b > 0:
                count += sigma_b * float(torch.randn((), generator=self.generator, dtype=torch.float64))
            unclipped_fraction = count / m
            self.clip_norm = clip * math.exp(-self.clip_learning_rate * (unclipped_fraction - self.target_quantile))
        self.accountant.step(self.noise_multiplier, q)
        self.rounds += 1
        self._last = {"dp/clip_norm": clip, "dp/clipped_fraction": num_clipped / m, "dp/noise_std": noise_std}
        return new_state

    def state_dict(self) -> dict:
        """Clip norm, round count, generator state, accountant history and the last round's metrics."""
        return {
            "clip_norm": self.clip_norm,
            "rounds": self.rounds,
            "generator": self.generator.get_state().clone(),
            "accountant": self.accountant.state_dict(),
            "last_metrics": dict(self._last),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved, so the next rounds are bitwise those of an uninterrupted run.

        Args:
            state: what ``state_dict`` returned.
        """
        self.clip_norm = float(state["clip_norm"])
        self.rounds = int(state["rounds"])
        self.generator.set_state(state["generator"].clone())
        self.accountant.load_state_dict(state["accountant"])
        self._last = dict(state["last_metrics"])


class ClippedSum(Accumulator):
    """DP-FedAvg's streaming accumulator: each update's delta to the global adapter is clipped to the round's C and
    added to one float64 sum (in arrival order) as it arrives; ``finish`` is ``DPFedAvg.release``. The mean divides
    by m, the number of updates, known only at the end; so do the sampling rate and the budget check, which still
    come before anything is released. Nothing of the aggregator changes before ``finish``.
    """

    def __init__(self, aggregator: DPFedAvg, global_state: dict[str, Tensor]) -> None:
        self.aggregator, self.global_state = aggregator, global_state
        self.clip = aggregator.clip_norm
        self.names = [name for name, t in global_state.items() if t.is_floating_point()]
        self.base = {name: global_state[name].detach().to("cpu", torch.float64) for name in self.names}
        self.total = {name: torch.zeros_like(self.base[name]) for name in self.names}
        self.num_clipped = self.count = 0

    def fold(self, update: ClientUpdate) -> None:
        delta = {name: update.state[name].detach().to("cpu", torch.float64) - self.base[name] for name in self.names}
        clipped, was_clipped = clip_update(delta, self.clip)
        del delta
        self.num_clipped += was_clipped
        for name in self.names:
            self.total[name] += clipped[name]
        self.count += 1

    def finish(self) -> dict[str, Tensor]:
        if not self.count:
            return self.global_state
        return self.aggregator.release(self.global_state, self)
