"""Per-client reward definitions: a reward multiplied by a scale each row carries (``FederatedData.client_columns``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ScaledReward:
    """``reward_func``'s value times the row's ``column`` (1 where the row has none); None stays None.

    With ``FederatedData(client_columns={0: {"reward_scale": 10.0}})`` client 0 scores the same verifier on a scale 10x
    the others', the heterogeneous-reward setting FGRPO and FedMOA are built for. Example YAML (``reward_funcs``)::

        - class_path: fedrl_lightning.rewards.scaled.ScaledReward
          init_args: {reward_func: fedrl_lightning.rewards.reasoning_gym_reward}

    Args:
        reward_func: the reward to scale (TRL signature).
        column: the row column holding the scale.
    """

    def __init__(self, reward_func: Callable[..., list[float | None]], column: str = "reward_scale") -> None:
        self.reward_func, self.column = reward_func, column
        name = getattr(reward_func, "__name__", type(reward_func).__name__)
        self.__name__ = f"scaled_{name}"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        values = self.reward_func(prompts=prompts, completions=completions, **kwargs)
        scales = kwargs.get(self.column) or [None] * len(values)
        return [
            None if v is None else v * (1.0 if s is None else float(s)) for v, s in zip(values, scales, strict=True)
        ]
