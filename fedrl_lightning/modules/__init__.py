"""The LightningModules: the policy, the policy-gradient core, and the RL algorithms built on it."""

from fedrl_lightning.modules.fedmoa import FedMOAModule
from fedrl_lightning.modules.grpo import GRPOBatch, GRPOModule
from fedrl_lightning.modules.pg import PolicyGradientBatch, PolicyGradientModule
from fedrl_lightning.modules.policy import PolicyModule
from fedrl_lightning.modules.ppo import PPOBatch, PPOModule

__all__ = [
    "FedMOAModule",
    "GRPOBatch",
    "GRPOModule",
    "PPOBatch",
    "PPOModule",
    "PolicyGradientBatch",
    "PolicyGradientModule",
    "PolicyModule",
]
