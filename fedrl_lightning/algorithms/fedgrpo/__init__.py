"""FedGRPO (AAAI 2026, arXiv 2602.12014), in one place.

- ``data``: ``FedGRPOData``: the server's questions, the experts' private data, the public auxiliary set.
- ``experts``: expert clients that score candidate answers with private means (``ExpertPool``: the wire, floats up).
- ``selection``: the confidence graph and the selectors that route questions to experts.
- ``reward``: ``ExpertReward``, the training reward (TRL's signature) bought from the selected experts.
- ``advantages``: FedGRPO's baselines over expert-scored groups (pure tensor functions).
- ``module``: ``FedGRPOModule``, the server policy's GRPO step with rewards bought from experts.
"""

from fedrl_lightning.algorithms.fedgrpo.data import FedGRPOData
from fedrl_lightning.algorithms.fedgrpo.experts import ExpertPool, ExpertSpec, agreement_reward
from fedrl_lightning.algorithms.fedgrpo.module import FedGRPOModule
from fedrl_lightning.algorithms.fedgrpo.reward import ExpertReward
from fedrl_lightning.algorithms.fedgrpo.selection import (
    ConfidenceSelector,
    OracleByDomainSelector,
    RandomSelector,
)

__all__ = [
    "ConfidenceSelector",
    "ExpertPool",
    "ExpertReward",
    "ExpertSpec",
    "FedGRPOData",
    "FedGRPOModule",
    "OracleByDomainSelector",
    "RandomSelector",
    "agreement_reward",
]
