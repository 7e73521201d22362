"""``FederatedData``: the LightningDataModule that gives every client a private train split and a held-out eval split.

The examples come from one of three sources: reasoning-gym tasks (``tasks.ReasoningGymTasks``, the default), local
JSONL/JSON/Parquet/CSV files (``files.LocalFiles``, with ``data_files``), or a ``datasets.Dataset``/``DatasetDict`` or
Hub dataset name (``user.DatasetRows``, with ``dataset``). This module checks the arguments, builds each client lazily
and caches it, and adds the per-client ``client_columns``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning

from fedrl_lightning.data.common import RESERVED_COLUMNS, REWARD_ARGUMENTS, Example, check
from fedrl_lightning.data.files import LocalFiles
from fedrl_lightning.data.tasks import ReasoningGymTasks
from fedrl_lightning.data.user import DatasetRows

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think briefly, then give only the final answer inside <answer></answer> tags, "
    "for example <answer>42</answer>."
)


class FederatedData(lightning.LightningDataModule):
    """Per-client train/eval prompt sets for federated GRPO.

    Examples are built lazily on first access and cached. Use ``train_examples(i)`` / ``eval_examples(i)`` per
    client, ``union_train_examples()`` for a centralized baseline, and ``describe()`` for a summary table.
    """

    def __init__(
        self,
        tasks: list[str] = ["basic_arithmetic"],
        task_kwargs: dict[str, dict[str, Any]] | None = None,
        num_clients: int = 2,
        partition: Literal["by_task", "dirichlet", "iid"] = "by_task",
        alpha: float = 0.5,
        train_size: int = 256,
        eval_size: int = 32,
        seed: int = 0,
        system_prompt: str | None = None,
        data_files: list[str] | None = None,
        dataset: Any = None,
        dataset_config: str | None = None,
        dataset_split: str | None = None,
        prompt_column: str = "prompt",
        answer_column: str | None = "answer",
        partition_by: str | None = None,
        task_column: str | None = None,
        eval_fraction: float = 0.1,
        client_columns: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        """Configure the federated data.

        Args:
            tasks: reasoning-gym task names (ignored when data_files or dataset is set).
            task_kwargs: Per-task config overrides passed to reasoning_gym.create_dataset, e.g.
                {"basic_arithmetic": {"max_terms": 3}}.
            num_clients: Number of federated clients.
            partition: How data is split over clients. by_task: client i gets task family i % len(tasks) (with
                more tasks than clients, client i gets tasks i, i + num_clients, ...); for user data the families are
                the sorted values of `partition_by`. dirichlet: each client's task mixture is drawn from
                Dirichlet(alpha) (user data: each value's rows are split over clients by Dirichlet(alpha)
                proportions). iid: every client gets an even share of every task (`partition_by` is ignored).
            alpha: Dirichlet concentration; small values give skewed, non-IID clients, large ones near-uniform.
            train_size: Train examples per client (reasoning-gym tasks only).
            eval_size: Held-out eval examples per client (reasoning-gym tasks only; 0 disables eval).
            seed: Seed from which all generation, partitioning and shuffling is derived.
            system_prompt: System message of the prompts. None (default): the answer-tag prompt
                (DEFAULT_SYSTEM_PROMPT) for reasoning-gym tasks, none for user data (data_files, dataset). A string:
                that system message everywhere (a user string prompt then becomes [system, user] chat messages).
                "": none anywhere.
            data_files: Local .jsonl/.json/.parquet/.csv files used instead of reasoning-gym. One file per client,
                or a single file partitioned over clients by `partition`.
            dataset: A datasets.Dataset, a datasets.DatasetDict or a Hub dataset name (e.g. "openai/gsm8k") used
                instead of reasoning-gym, partitioned over clients by `partition`. A DatasetDict's "train" split is
                partitioned and its "test" (else "validation") split, if any, is the held-out eval, dealt the same
                way; otherwise `eval_fraction` of each client's rows is held out. A Hub name is loaded on first use
                with datasets.load_dataset (from the cache when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set).
            dataset_config: The Hub dataset's configuration name (e.g. "main").
            dataset_split: The split to use (e.g. "train"), held out by `eval_fraction`; None = every split.
            prompt_column: Column holding the prompt, in TRL's formats: a string (tokenized as is, no chat
                template) or a list of chat messages (chat-templated).
            answer_column: Column holding the reference answer; None when the data has none.
            partition_by: Column whose values by_task/dirichlet partition user data by, e.g. "source"; needed for
                them on a single file or a dataset.
            task_column: Deprecated alias of `partition_by`.
            eval_fraction: Fraction of each client's rows held out for eval (user data without an eval split).
            client_columns: Extra columns added to every row of a client, e.g. {0: {"reward_scale": 10.0}}; reward
                functions receive them as keyword arguments, so clients can define their rewards differently.
        """
        super().__init__()
        self.save_hyperparameters(ignore=[] if dataset is None or isinstance(dataset, str) else ["dataset"])
        if task_column is not None:
            warnings.warn("task_column is deprecated, use partition_by", DeprecationWarning, stacklevel=2)
            check(partition_by in (None, task_column), f"partition_by={partition_by!r} and task_column disagree")
            partition_by = task_column
        check(data_files is None or dataset is None, "set one of data_files and dataset, not both")
        if isinstance(data_files, str | Path):
            data_files = [str(data_files)]
        check(isinstance(num_clients, int) and num_clients >= 1, f"num_clients must be an int >= 1, got {num_clients}")
        check(
            partition in ("by_task", "dirichlet", "iid"), f"partition must be by_task, dirichlet or iid: {partition!r}"
        )
        check(alpha > 0 and math.isfinite(alpha), f"alpha must be a finite number > 0, got {alpha}")
        check(isinstance(train_size, int) and train_size >= 1, f"train_size must be an int >= 1, got {train_size}")
        check(isinstance(eval_size, int) and eval_size >= 0, f"eval_size must be an int >= 0, got {eval_size}")
        check(isinstance(seed, int) and seed >= 0, f"seed must be an int >= 0, got {seed}")
        check(0 <= eval_fraction < 1, f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self._num_clients = num_clients
        self.partition, self.alpha, self.seed = partition, float(alpha), seed
        self.train_size, self.eval_size = train_size, eval_size
        self.system_prompt = system_prompt  # as given: None means "the default, for reasoning-gym only"
        self.prompt_column, self.answer_column, self.partition_by = prompt_column, answer_column, partition_by
        self.task_column = partition_by  # the deprecated name, still read by older callers
        self.dataset, self.dataset_config, self.dataset_split = dataset, dataset_config, dataset_split
        self.eval_fraction = eval_fraction
        self.tasks = list(tasks)
        self.task_kwargs = {k: dict(v) for k, v in (task_kwargs or {}).items()}
        self.data_files = [str(f) for f in data_files] if data_files is not None else None
        self._cache: dict[int, tuple[list[Example], list[Example]]] = {}
        self.client_columns = {int(k): dict(v) for k, v in (client_columns or {}).items()}
        for cid, columns in self.client_columns.items():
            check(0 <= cid < num_clients, f"client_columns has an entry for client {cid}, not in [0, {num_clients})")
            reserved = sorted(set(columns) & {*RESERVED_COLUMNS, *REWARD_ARGUMENTS})
            check(not reserved, f"client_columns[{cid}] must not set the reserved columns {reserved}")
        self._source: LocalFiles | DatasetRows | ReasoningGymTasks
        user = dict(
            num_clients=num_clients,
            partition=partition,
            alpha=self.alpha,
            seed=seed,
            eval_fraction=eval_fraction,
            prompt_column=prompt_column,
            answer_column=answer_column,
            partition_by=partition_by,
            system_prompt=system_prompt or None,  # user data opts in to a system prompt
        )
        if self.data_files is not None:
            self._source = LocalFiles(self.data_files, **user)
        elif dataset is not None:
            self._source = DatasetRows(dataset, dataset_config, dataset_split, **user)
        else:
            check(partition_by is None, "partition_by applies to user data (data_files or dataset), not to tasks")
            self._source = ReasoningGymTasks(
                tasks=self.tasks,
                task_kwargs=self.task_kwargs,
                num_clients=num_clients,
                partition=partition,
                alpha=self.alpha,
                train_size=train_size,
                eval_size=eval_size,
                seed=seed,
                system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt or None,
            )

    # ------------------------------------------------------------------ public API

    @property
    def num_clients(self) -> int:
        """Number of federated clients."""
        return self._num_clients

    def client_ids(self) -> list[int]:
        """Client ids, ``0 .. num_clients - 1``."""
        return list(range(self._num_clients))

    def setup(self, stage: str | None = None) -> None:
        """Build every client's data up front so that data errors surface before training."""
        for cid in self.client_ids():
            self._client(cid)

    def train_examples(self, client_id: int) -> list[Example]:
        """The private train examples of one client (a new list; the dicts are shared, do not mutate)."""
        return list(self._client(client_id)[0])

    def eval_examples(self, client_id: int) -> list[Example]:
        """The held-out eval examples of one client; no question also appears in its train set."""
        return list(self._client(client_id)[1])

    def union_train_examples(self) -> list[Example]:
        """Every client's train examples concatenated in client order (centralized baseline)."""
        return [ex for cid in self.client_ids() for ex in self._client(cid)[0]]

    def describe(self) -> list[dict[str, Any]]:
        """One row per client: ``client_id``, ``n_train``, ``n_eval`` and ``task_counts`` (train, by task)."""
        rows = []
        for cid in self.client_ids():
            train, evals = self._client(cid)
            counts = dict(sorted(Counter(ex["task"] for ex in train).items()))
            rows.append({"client_id": cid, "n_train": len(train), "n_eval": len(evals), "task_counts": counts})
        return rows

    # ------------------------------------------------------------------ building

    def _client(self, client_id: int) -> tuple[list[Example], list[Example]]:
        if client_id not in range(self._num_clients):
            raise ValueError(f"client_id must be in [0, {self._num_clients}), got {client_id}")
        if client_id not in self._cache:
            if isinstance(self._source, ReasoningGymTasks):
                built = {client_id: self._source.build_client(client_id)}
            else:  # user data partitions are computed jointly, so build all clients at once
                built = self._source.build_clients()
            for cid, (train, evals) in built.items():
                columns = self.client_columns.get(cid, {})
                self._cache[cid] = ([{**ex, **columns} for ex in train], [{**ex, **columns} for ex in evals])
        return self._cache[client_id]
