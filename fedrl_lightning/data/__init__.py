"""Federated prompt/answer data: reasoning-gym tasks, local files or ``datasets`` data, partitioned over clients.

Every client owns a private train split and a held-out eval split of examples in TRL's prompt formats::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": str, "task": str, "rg_entry": dict | None}
    {"prompt": "a plain-text prompt", "answer": str | None, "task": str, "rg_entry": None, **other_columns}

All randomness is derived from ``seed`` with numpy ``SeedSequence`` keys, so the same arguments always give
the same examples, independent of which client is built first.

Modules: ``federated`` (``FederatedData``, the LightningDataModule), ``tasks`` (reasoning-gym task families and
their partitions), ``rows`` (a user's rows: conversion, partition by a column, eval hold-out), ``files`` (local
JSONL/JSON/Parquet/CSV files), ``user`` (a ``datasets.Dataset``/``DatasetDict`` or a Hub name), ``sampler``
(``ClientSampler``, the resumable per-client batch stream) and ``common`` (the example format and helpers they
share). The public names are importable from here, e.g. ``class_path: fedrl_lightning.data.FederatedData`` in YAML.
"""

from fedrl_lightning.data.common import Example
from fedrl_lightning.data.federated import DEFAULT_SYSTEM_PROMPT, FederatedData
from fedrl_lightning.data.sampler import ClientSampler

__all__ = ["DEFAULT_SYSTEM_PROMPT", "ClientSampler", "Example", "FederatedData"]
