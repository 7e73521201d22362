"""Federated prompt/answer data: reasoning-gym tasks or local JSONL/Parquet files, partitioned over clients.

Every client owns a private train split and a held-out eval split of TRL conversational examples::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": str, "task": str, "rg_entry": dict | None}

All randomness is derived from ``seed`` with numpy ``SeedSequence`` keys, so the same arguments always give
the same examples, independent of which client is built first.
"""

from __future__ import annotations

import difflib
import json
import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import reasoning_gym
from reasoning_gym.factory import DATASETS

__all__ = ["DEFAULT_SYSTEM_PROMPT", "ClientSampler", "FederatedData"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think briefly, then give only the final answer inside <answer></answer> tags, "
    "for example <answer>42</answer>."
)

Example = dict[str, Any]
_SUFFIXES = (".jsonl", ".json", ".parquet")
_RESERVED = ("prompt", "answer", "task", "rg_entry")
# SeedSequence stream tags, so that e.g. the mixture draw and the item seeds of one client never share a stream.
_MIX, _ORDER, _ITEMS, _FILES, _SAMPLER = 11, 12, 13, 14, 15


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _derived_seed(*key: int) -> int:
    # reasoning-gym items use Random(seed + index): hashed seeds keep (client, split) windows apart, unlike seed + k.
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _json_safe(obj: Any) -> Any:
    """Return ``obj`` as plain JSON types so that ``json.loads(json.dumps(x)) == x`` (tuples -> lists, ...)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [_json_safe(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray | np.generic):
        return _json_safe(obj.tolist())
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": user}]


def _even_counts(total: int, k: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` into ``k`` counts differing by at most one; the remainder goes to random slots."""
    counts = [total // k] * k
    for j in rng.permutation(k)[: total % k]:
        counts[int(j)] += 1
    return counts


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
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        data_files: list[str] | None = None,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        task_column: str | None = None,
        eval_fraction: float = 0.1,
        client_columns: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        """Configure the federated data.

        Args:
            tasks: reasoning-gym task names (ignored when data_files is set).
            task_kwargs: Per-task config overrides passed to reasoning_gym.create_dataset, e.g.
                {"basic_arithmetic": {"max_terms": 3}}.
            num_clients: Number of federated clients.
            partition: How data is split over clients. by_task: client i gets task family i % len(tasks) (with
                more tasks than clients, client i gets tasks i, i + num_clients, ...). dirichlet: each client's task
                mixture is drawn from Dirichlet(alpha) (single data file: each task's rows are split over clients by
                Dirichlet(alpha) proportions). iid: every client gets an even share of every task.
            alpha: Dirichlet concentration; small values give skewed, non-IID clients, large ones near-uniform.
            train_size: Train examples per client (reasoning-gym tasks only).
            eval_size: Held-out eval examples per client (reasoning-gym tasks only; 0 disables eval).
            seed: Seed from which all generation, partitioning and shuffling is derived.
            system_prompt: System message prepended to string prompts; None or empty omits it.
            data_files: Local .jsonl/.json/.parquet files used instead of reasoning-gym. One file per client, or a
                single file partitioned over clients by `partition`.
            prompt_column: Column holding the prompt: a string (becomes the user message) or a list of chat messages
                (used as is).
            answer_column: Column holding the reference answer.
            task_column: Column naming each row's task family; needed by by_task/dirichlet on a single file.
            eval_fraction: Fraction of each client's file rows held out for eval (data_files only).
            client_columns: Extra columns added to every row of a client, e.g. {0: {"reward_scale": 10.0}}; reward
                functions receive them as keyword arguments, so clients can define their rewards differently.
        """
        super().__init__()
        self.save_hyperparameters()
        if isinstance(data_files, str | Path):
            data_files = [str(data_files)]
        _check(isinstance(num_clients, int) and num_clients >= 1, f"num_clients must be an int >= 1, got {num_clients}")
        _check(
            partition in ("by_task", "dirichlet", "iid"), f"partition must be by_task, dirichlet or iid: {partition!r}"
        )
        _check(alpha > 0 and math.isfinite(alpha), f"alpha must be a finite number > 0, got {alpha}")
        _check(isinstance(train_size, int) and train_size >= 1, f"train_size must be an int >= 1, got {train_size}")
        _check(isinstance(eval_size, int) and eval_size >= 0, f"eval_size must be an int >= 0, got {eval_size}")
        _check(isinstance(seed, int) and seed >= 0, f"seed must be an int >= 0, got {seed}")
        _check(0 <= eval_fraction < 1, f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self._num_clients = num_clients
        self.partition, self.alpha, self.seed = partition, float(alpha), seed
        self.train_size, self.eval_size = train_size, eval_size
        self.system_prompt = system_prompt or None
        self.prompt_column, self.answer_column, self.task_column = prompt_column, answer_column, task_column
        self.eval_fraction = eval_fraction
        self.tasks = list(tasks)
        self.task_kwargs = {k: dict(v) for k, v in (task_kwargs or {}).items()}
        self.data_files = [str(f) for f in data_files] if data_files is not None else None
        self._cache: dict[int, tuple[list[Example], list[Example]]] = {}
        self.client_columns = {int(k): dict(v) for k, v in (client_columns or {}).items()}
        for cid, columns in self.client_columns.items():
            _check(0 <= cid < num_clients, f"client_columns has an entry for client {cid}, not in [0, {num_clients})")
            reserved = sorted(set(columns) & set(_RESERVED))
            _check(not reserved, f"client_columns[{cid}] must not set the reserved columns {reserved}")
        if self.data_files is not None:
            self._validate_files()
        else:
            self._validate_tasks()

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

    # ------------------------------------------------------------------ validation

    def _validate_tasks(self) -> None:
        _check(len(self.tasks) > 0, "tasks must name at least one reasoning-gym task")
        dupes = sorted(t for t, n in Counter(self.tasks).items() if n > 1)
        _check(not dupes, f"tasks contains duplicates: {dupes}")
        for name in self.tasks:
            if name not in DATASETS:
                close = difflib.get_close_matches(name, DATASETS, n=3)
                hint = f" Did you mean {close}?" if close else ""
                names = sorted(DATASETS)
                raise ValueError(
                    f"Unknown reasoning-gym task {name!r}.{hint} Valid tasks ({len(names)}) include: "
                    f"{', '.join(names[:25])}, ..."
                )
        extra = sorted(set(self.task_kwargs) - set(self.tasks))
        _check(not extra, f"task_kwargs has entries for tasks not in tasks: {extra} (tasks: {self.tasks})")
        for name in self.tasks:
            kwargs = self.task_kwargs.get(name, {})
            reserved = sorted({"size", "seed"} & set(kwargs))
            _check(not reserved, f"task_kwargs[{name!r}] must not set {reserved}: use train_size/eval_size/seed")
            try:  # fail fast at construction time (e.g. from the CLI) rather than mid-training
                reasoning_gym.create_dataset(name, size=1, seed=0, **kwargs)
            except (TypeError, ValueError, AssertionError) as err:
                raise ValueError(f"Invalid task_kwargs for task {name!r} {kwargs}: {err}") from err

    def _validate_files(self) -> None:
        files = self.data_files or []
        _check(len(files) > 0, "data_files must list at least one file")
        _check(
            len(files) in (1, self._num_clients),
            f"data_files must hold 1 file or num_clients={self._num_clients} files, got {len(files)}: {files}",
        )
        for f in files:
            _check(
                Path(f).suffix.lower() in _SUFFIXES, f"Unsupported data file extension: {f} (use .jsonl/.json/.parquet)"
            )
            _check(Path(f).is_file(), f"Data file not found: {f}")
        if len(files) == 1 and self._num_clients > 1 and self.partition != "iid":
            _check(
                self.task_column is not None,
                f"partition={self.partition!r} of the single data file {files[0]} needs task_column; "
                "set task_column or use partition='iid'",
            )

    # ------------------------------------------------------------------ building

    def _client(self, client_id: int) -> tuple[list[Example], list[Example]]:
        if client_id not in range(self._num_clients):
            raise ValueError(f"client_id must be in [0, {self._num_clients}), got {client_id}")
        if client_id not in self._cache:
            if self.data_files is None:
                built = {client_id: self._build_rg_client(client_id)}
            else:  # file partitions are computed jointly, so build all clients at once
                built = self._build_file_clients()
            for cid, (train, evals) in built.items():
                columns = self.client_columns.get(cid, {})
                self._cache[cid] = ([{**ex, **columns} for ex in train], [{**ex, **columns} for ex in evals])
        return self._cache[client_id]

    def _task_counts(self, client_id: int) -> tuple[dict[str, int], dict[str, int]]:
        """How many train and eval items this client draws from each task family."""
        n_tasks, rng = len(self.tasks), _rng(self.seed, _MIX, client_id)
        if self.partition == "dirichlet":  # train and eval follow the same per-client mixture
            mixture = rng.dirichlet(np.full(n_tasks, self.alpha))
            train, evals = rng.multinomial(self.train_size, mixture), rng.multinomial(self.eval_size, mixture)
            return dict(zip(self.tasks, map(int, train))), dict(zip(self.tasks, map(int, evals)))
        own = self.tasks
        if self.partition == "by_task":
            n_clients = self._num_clients
            own = [self.tasks[client_id % n_tasks]] if n_tasks <= n_clients else self.tasks[client_id::n_clients]
        train_counts = _even_counts(self.train_size, len(own), rng)
        return dict(zip(own, train_counts)), dict(zip(own, _even_counts(self.eval_size, len(own), rng)))

    def _build_rg_client(self, client_id: int) -> tuple[list[Example], list[Example]]:
        splits: list[list[Example]] = []
        train_questions: set[str] = set()
        for split, counts in enumerate(self._task_counts(client_id)):
            examples: list[Example] = []
            for task, n in counts.items():
                if n == 0:
                    continue
                item_seed = _derived_seed(self.seed, _ITEMS, client_id, split, zlib.crc32(task.encode()))
                # eval drops repeats and anything in this client's train set; train keeps repeats (tiny task spaces)
                entries = self._generate(task, item_seed, n, exclude=train_questions if split else None)
                examples += [self._rg_example(task, e) for e in entries]
            order = _rng(self.seed, _ORDER, client_id, split).permutation(len(examples))
            splits.append([examples[int(i)] for i in order])
            if split == 0:
                train_questions = {ex["rg_entry"]["question"] for ex in splits[0]}
        return splits[0], splits[1]

    def _generate(self, task: str, seed: int, n: int, exclude: set[str] | None) -> list[dict[str, Any]]:
        kwargs = self.task_kwargs.get(task, {})
        size, limit = max(2 * n, 16), 20 * n + 1000
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
        if exclude is None:
            return [dataset[i] for i in range(n)]
        seen, out, idx = set(exclude), [], 0
        while len(out) < n:
            if idx >= limit:
                raise ValueError(
                    f"Task {task!r} yielded only {len(out)} of {n} eval questions distinct from the train set after "
                    f"{limit} draws; lower eval_size/train_size or widen its task_kwargs"
                )
            if idx >= size:  # generate extras to refill
                size *= 2
                dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
            entry, idx = dataset[idx], idx + 1
            if entry["question"] not in seen:
                seen.add(entry["question"])
                out.append(entry)
        return out

    def _rg_example(self, task: str, entry: dict[str, Any]) -> Example:
        entry = _json_safe(entry)
        answer = "" if entry.get("answer") is None else str(entry["answer"])
        prompt = _messages(self.system_prompt, entry["question"])
        return {"prompt": prompt, "answer": answer, "task": task, "rg_entry": entry}

    # ------------------------------------------------------------------ local files

    def _build_file_clients(self) -> dict[int, tuple[list[Example], list[Example]]]:
        files = self.data_files or []
        if len(files) == self._num_clients:
            owned = {cid: (f, self._load_file(f)) for cid, f in enumerate(files)}
        else:
            rows = self._load_file(files[0])
            owned = {cid: (files[0], part) for cid, part in enumerate(self._partition_rows(rows))}
        out = {}
        for cid, (path, rows) in owned.items():
            order = _rng(self.seed, _FILES, 1, cid).permutation(len(rows))
            shuffled = [rows[int(i)] for i in order]
            n_eval = min(round(len(rows) * self.eval_fraction), max(len(rows) - 1, 0))
            train, evals = shuffled[n_eval:], shuffled[:n_eval]
            if not train:
                raise ValueError(
                    f"Client {cid} has no train rows from {path} (partition={self.partition!r}, alpha={self.alpha}); "
                    "add rows, use fewer clients, or raise alpha"
                )
            train_keys = {_prompt_key(ex["prompt"]) for ex in train}
            out[cid] = (train, [ex for ex in evals if _prompt_key(ex["prompt"]) not in train_keys])
        return out

    def _partition_rows(self, rows: list[Example]) -> list[list[Example]]:
        n_clients, parts = self._num_clients, [[] for _ in range(self._num_clients)]
        if n_clients == 1:
            return [rows]
        if self.partition == "iid":
            order = _rng(self.seed, _FILES, 2).permutation(len(rows))
            return [[rows[int(i)] for i in chunk] for chunk in np.array_split(order, n_clients)]
        groups: dict[str, list[Example]] = {}
        for ex in rows:
            groups.setdefault(ex["task"], []).append(ex)
        for g, name in enumerate(sorted(groups)):
            members = groups[name]
            order = _rng(self.seed, _FILES, 3, zlib.crc32(name.encode())).permutation(len(members))
            if self.partition == "dirichlet":  # label-skew split: this task's rows go to clients ~ Dirichlet(alpha)
                props = _rng(self.seed, _FILES, 4, zlib.crc32(name.encode())).dirichlet(np.full(n_clients, self.alpha))
                cuts = (np.cumsum(props)[:-1] * len(members)).astype(int)
                owners, chunks = list(range(n_clients)), np.split(order, cuts)
            else:  # by_task: group g goes to client g % C; clients sharing a group split its rows
                shared = len(groups) <= n_clients
                owners = [c for c in range(n_clients) if c % len(groups) == g] if shared else [g % n_clients]
                chunks = np.array_split(order, len(owners))
            for owner, chunk in zip(owners, chunks):
                parts[owner] += [members[int(i)] for i in chunk]
        return parts

    def _load_file(self, path: str) -> list[Example]:
        suffix = Path(path).suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns, records = list(table.column_names), table.to_pylist()
        else:
            records, columns = _read_json_records(path), []
            for rec in records:
                columns += [k for k in rec if k not in columns]
        _check(len(records) > 0, f"{path}: no rows")
        for col, what in ((self.prompt_column, "prompt"), (self.answer_column, "answer"), (self.task_column, "task")):
            _check(col is None or col in columns, f"{path}: missing {what} column {col!r} (columns found: {columns})")
        return [self._file_example(path, i, rec) for i, rec in enumerate(records)]

    def _file_example(self, path: str, row: int, rec: dict[str, Any]) -> Example:
        where = f"{path}: row {row}"
        raw = rec.get(self.prompt_column)
        if isinstance(raw, str):
            _check(raw.strip() != "", f"{where}, column {self.prompt_column!r}: empty prompt")
            prompt = _messages(self.system_prompt, raw)
        elif isinstance(raw, list | tuple):
            _check(len(raw) > 0, f"{where}, column {self.prompt_column!r}: empty prompt")
            ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in raw)
            _check(ok, f"{where}, column {self.prompt_column!r}: chat messages need 'role' and 'content' keys")
            prompt = [dict(m) for m in raw]
        else:
            _check(raw is not None, f"{where}, column {self.prompt_column!r}: empty prompt")
            raise ValueError(f"{where}, column {self.prompt_column!r}: prompt must be a string or a list of messages")
        answer = rec.get(self.answer_column)
        _check(answer is not None, f"{where}, column {self.answer_column!r}: missing answer")
        answer = answer if isinstance(answer, str) else json.dumps(_json_safe(answer))
        if self.task_column is not None:
            _check(rec.get(self.task_column) is not None, f"{where}, column {self.task_column!r}: missing task")
            task = str(rec[self.task_column])
        else:
            task = Path(path).stem
        meta, rg_entry = rec.get("metadata"), None
        if isinstance(raw, str) and isinstance(meta, dict) and str(meta.get("source_dataset")) in DATASETS:
            # rows exported from reasoning-gym keep their verifier
            rg_entry = _json_safe({"question": raw, "answer": answer, "metadata": meta})
        skip = {self.prompt_column, self.answer_column, *_RESERVED}
        extras = {k: v for k, v in rec.items() if k not in skip}
        return {**extras, "prompt": prompt, "answer": answer, "task": task, "rg_entry": rg_entry}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _prompt_key(prompt: list[dict[str, Any]]) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)


def _read_json_records(path: str) -> list[dict[str, Any]]:
    """Read JSON Lines (or, for .json, a top-level array of objects), naming the line of any bad record."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from err
        lines = [(i, item) for i, item in enumerate(items)]
        label = "row"
    else:
        lines, label = [], "line"
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    lines.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON: {err}") from err
    for n, item in lines:
        _check(isinstance(item, dict), f"{path}: {label} {n} is not a JSON object")
    return [item for _, item in lines]


class ClientSampler:
    """Deterministic, resumable batches of example indices for one client.

    Reshuffles each epoch with seed ``(seed, client_id, epoch)``, so a restored ``state_dict`` continues exactly.
    """

    def __init__(self, num_examples: int, seed: int, client_id: int) -> None:
        """Create a sampler.

        Args:
            num_examples: Size of the client's example list (>= 1).
            seed: Base seed (>= 0).
            client_id: Client id (>= 0); different clients get different orders.
        """
        _check(num_examples >= 1, f"ClientSampler needs num_examples >= 1, got {num_examples}")
        _check(seed >= 0 and client_id >= 0, f"seed and client_id must be >= 0, got {seed}, {client_id}")
        self.num_examples, self.seed, self.client_id = num_examples, seed, client_id
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = _rng(self.seed, _SAMPLER, self.client_id, self.epoch).permutation(self.num_examples)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self, batch_size: int) -> list[int]:
        """Return the next ``batch_size`` indices, wrapping into the next (reshuffled) epoch as needed."""
        _check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            take = min(batch_size - len(out), self.num_examples - self.position)
            out += self._permutation()[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        """Position to resume from (plus the identity it was created with, checked on load)."""
        return {k: getattr(self, k) for k in ("num_examples", "seed", "client_id", "epoch", "position")}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``; the continuation is identical to the uninterrupted sampler's."""
        for key in ("num_examples", "seed", "client_id"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"ClientSampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        _check(epoch >= 0 and 0 <= position < self.num_examples, f"Invalid ClientSampler state: {state}")
        self.epoch, self.position = epoch, position
