"""A ``datasets.Dataset``/``DatasetDict`` or a Hub dataset name as per-client train/eval splits.

The train rows (a ``Dataset``, or a ``DatasetDict``'s ``train`` split) are partitioned over the clients as a single
file's (``rows.UserRows``); a ``DatasetDict``'s ``test`` (else ``validation``) split is the held-out eval, dealt to the
clients the same way; without one, ``eval_fraction`` of each client's rows is held out. A Hub name is loaded with
``datasets.load_dataset`` on first use: from the local cache when offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``,
honoured even when set after ``datasets`` was imported), and a dataset neither cached nor reachable is one line
naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedrl_lightning.data.common import check
from fedrl_lightning.data.rows import Split, Table, UserRows

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("test", "validation")
"""The ``DatasetDict`` splits used as held-out eval, in order of preference."""
_TRUE = {"1", "ON", "YES", "TRUE"}


class DatasetRows(UserRows):
    """Per-client train/eval examples from a ``datasets`` object or a Hub name (``FederatedData`` with ``dataset``)."""

    def __init__(self, dataset: Any, config: str | None = None, split: str | None = None, **kwargs: Any) -> None:
        """Check the dataset's type and, for an object, its columns (a Hub name is loaded on ``build_clients``).

        Args:
            dataset: a ``datasets.Dataset``, a ``datasets.DatasetDict`` or a Hub dataset name (or local path that
                ``datasets.load_dataset`` reads).
            config: the Hub dataset's configuration name (e.g. ``main`` for ``openai/gsm8k``).
            split: the Hub split to load (a ``Dataset``, held out by ``eval_fraction``); None loads every split.
            **kwargs: the conversion and partition settings, see ``rows.UserRows``.

        Raises:
            ValueError: an unsupported type, a ``DatasetDict`` without a train split, missing columns, or a
                partition by value without ``partition_by``.
        """
        super().__init__(**kwargs)
        self.dataset, self.config, self.split = dataset, config, split
        self.name = dataset if isinstance(dataset, str) else type(dataset).__name__
        check(
            isinstance(dataset, str) or _is_dataset(dataset) or _is_dataset_dict(dataset),
            f"dataset must be a datasets.Dataset, a datasets.DatasetDict or a Hub dataset name, got {self.name}",
        )
        check(isinstance(dataset, str) or config is None, "dataset_config needs a Hub dataset name")
        check(split is None or not _is_dataset(dataset), "dataset_split needs a Hub name or a DatasetDict")
        check(not isinstance(dataset, str) or dataset.strip() != "", "dataset must not be an empty name")
        self.check_partition(f"dataset {self.name!r}")
        self._tables: tuple[Table, Table | None] | None = None
        if not isinstance(dataset, str):  # fail fast on the columns of an object in hand
            self.examples(self.tables()[0])

    def tables(self) -> tuple[Table, Table | None]:
        """The (train, held-out or None) tables, loading a Hub name once."""
        if self._tables is None:
            data = self.dataset
            if isinstance(data, str):
                data = load_hub_dataset(data, self.config, self.split)
            elif self.split is not None:  # one split of a DatasetDict in hand, held out by eval_fraction
                check(self.split in data, f"dataset has no split {self.split!r} (splits: {list(data)})")
                data = data[self.split]
            label = Path(self.dataset).name if isinstance(self.dataset, str) else "dataset"
            self._tables = _split_tables(data, self.name, label)
        return self._tables

    def build_clients(self) -> dict[int, Split]:
        """Every client's (train, eval) examples, built jointly.

        Raises:
            ValueError: a Hub dataset neither cached nor reachable, missing columns, or a client without train rows.
        """
        train, held_out = self.tables()
        return self.split_tables([train], held_out)


def _is_dataset(obj: Any) -> bool:
    import datasets

    return isinstance(obj, datasets.Dataset)


def _is_dataset_dict(obj: Any) -> bool:
    import datasets

    return isinstance(obj, datasets.DatasetDict)


def _table(dataset: Any, name: str, label: str, split: str | None) -> Table:
    where = f"dataset {name!r}" + (f" split {split!r}" if split else "")
    return Table(where, label, dataset.to_list(), list(dataset.column_names))


def _split_tables(data: Any, name: str, label: str) -> tuple[Table, Table | None]:
    if _is_dataset(data):
        return _table(data, name, label, None), None
    check(_is_dataset_dict(data), f"dataset {name!r} loaded as a {type(data).__name__}, not a Dataset/DatasetDict")
    splits = list(data)
    train = TRAIN_SPLIT if TRAIN_SPLIT in splits else (splits[0] if len(splits) == 1 else None)
    check(train is not None, f"dataset {name!r} has no {TRAIN_SPLIT!r} split (splits: {splits}); pass dataset_split")
    held = next((s for s in EVAL_SPLITS if s in splits and s != train), None)
    held_out = _table(data[held], name, label, held) if held is not None else None
    return _table(data[train], name, label, train), held_out


def load_hub_dataset(name: str, config: str | None, split: str | None) -> Any:
    """``datasets.load_dataset(name, config, split=split)``, any failure as a one-line ``ValueError`` naming it."""
    import datasets

    cache = os.environ.get("HF_DATASETS_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "datasets") if os.environ.get("HF_HOME") else None
    )
    try:
        with _offline_from_env():
            return datasets.load_dataset(name, config, split=split, cache_dir=cache)
    except (ConnectionError, FileNotFoundError) as err:
        offline = " (offline mode is on)" if _env_offline() else ""
        raise ValueError(
            f"dataset {name!r} is neither in the local cache nor reachable on the Hub{offline}: "
            f"{_first_line(err)}; download it once online, or pass a datasets.Dataset"
        ) from None
    except Exception as err:  # noqa: BLE001 - a bad config or split name, an unreadable file, ...: one line
        raise ValueError(f"dataset {name!r} (config {config!r}, split {split!r}): {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextmanager
def _offline_from_env() -> Iterator[None]:
    """Offline mode while it is on in the environment now: ``datasets`` and ``huggingface_hub`` read it once, at
    import, and would otherwise retry an unreachable Hub for tens of seconds."""
    if not _env_offline():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
