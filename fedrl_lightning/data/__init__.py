"""Federated prompt/answer data: reasoning-gym tasks or local JSONL/Parquet files, partitioned over clients.

Every client owns a private train split and a held-out eval split of TRL conversational examples::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": str, "task": str, "rg_entry": dict | None}

All randomness is derived from ``seed`` with numpy ``SeedSequence`` keys, so the same arguments always give
the same examples, independent of which client is built first.

Modules: ``federated`` (``FederatedData``, the LightningDataModule), ``tasks`` (reasoning-gym task families and
their partitions), ``files`` (local files and their partitions), ``sampler`` (``ClientSampler``, the resumable
per-client batch stream) and ``common`` (the example format and helpers they share). The public names are importable
from here, e.g. ``class_path: fedrl_lightning.data.FederatedData`` in YAML.
"""

from fedrl_lightning.data.common import Example
from fedrl_lightning.data.federated import DEFAULT_SYSTEM_PROMPT, FederatedData
from fedrl_lightning.data.sampler import ClientSampler

__all__ = ["DEFAULT_SYSTEM_PROMPT", "ClientSampler", "Example", "FederatedData"]
