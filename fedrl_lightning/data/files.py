"""Local JSONL/JSON/Parquet files as per-client train/eval splits: checks, row conversion, partitioning, eval hold-out.

One file per client, or a single file split over the clients by ``partition`` (``iid``: even random shares;
``by_task``: task groups to clients; ``dirichlet``: each task's rows over the clients in Dirichlet(alpha)
proportions). Each row becomes a TRL conversational example (``common.Example``); its other columns ride along, so
reward functions receive them as keyword arguments.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from reasoning_gym.factory import DATASETS

from fedrl_lightning.data.common import (
    FILES_STREAM,
    RESERVED_COLUMNS,
    Example,
    chat_messages,
    check,
    json_safe,
    seeded_rng,
)

SUFFIXES = (".jsonl", ".json", ".parquet")
"""The file types ``LocalFiles`` reads."""


class LocalFiles:
    """Per-client train/eval examples read from local files (``FederatedData`` with ``data_files``)."""

    def __init__(
        self,
        files: list[str],
        num_clients: int,
        partition: str,
        alpha: float,
        seed: int,
        eval_fraction: float,
        prompt_column: str,
        answer_column: str,
        task_column: str | None,
        system_prompt: str | None,
    ) -> None:
        """Check that the files exist and fit the partition (rows are read on ``build_clients``).

        Args:
            files: one file per client, or a single file partitioned over the clients.
            num_clients: number of federated clients.
            partition: ``by_task``, ``dirichlet`` or ``iid`` (see ``FederatedData``).
            alpha: Dirichlet concentration of the ``dirichlet`` partition.
            seed: base seed of the partition and the shuffles.
            eval_fraction: fraction of each client's rows held out for eval.
            prompt_column: column holding the prompt: a string (the user message) or a list of chat messages.
            answer_column: column holding the reference answer.
            task_column: column naming each row's task family; None names it after the file.
            system_prompt: system message prepended to string prompts; None omits it.

        Raises:
            ValueError: no files, a count other than 1 or ``num_clients``, a missing file or unsupported extension,
                or a single file partitioned by task without ``task_column``.
        """
        self.files, self.num_clients, self.partition, self.alpha, self.seed = files, num_clients, partition, alpha, seed
        self.eval_fraction, self.system_prompt = eval_fraction, system_prompt
        self.prompt_column, self.answer_column, self.task_column = prompt_column, answer_column, task_column
        self._validate()

    def _validate(self) -> None:
        files = self.files
        check(len(files) > 0, "data_files must list at least one file")
        check(
            len(files) in (1, self.num_clients),
            f"data_files must hold 1 file or num_clients={self.num_clients} files, got {len(files)}: {files}",
        )
        for f in files:
            check(
                Path(f).suffix.lower() in SUFFIXES, f"Unsupported data file extension: {f} (use .jsonl/.json/.parquet)"
            )
            check(Path(f).is_file(), f"Data file not found: {f}")
        if len(files) == 1 and self.num_clients > 1 and self.partition != "iid":
            check(
                self.task_column is not None,
                f"partition={self.partition!r} of the single data file {files[0]} needs task_column; "
                "set task_column or use partition='iid'",
            )

    def build_clients(self) -> dict[int, tuple[list[Example], list[Example]]]:
        """Every client's (train, eval) examples, built jointly (a single file's partition spans all clients).

        Raises:
            ValueError: unreadable rows, missing columns, or a client left without train rows.
        """
        files = self.files
        if len(files) == self.num_clients:
            owned = {cid: (f, self._load_file(f)) for cid, f in enumerate(files)}
        else:
            rows = self._load_file(files[0])
            owned = {cid: (files[0], part) for cid, part in enumerate(self._partition_rows(rows))}
        out = {}
        for cid, (path, rows) in owned.items():
            order = seeded_rng(self.seed, FILES_STREAM, 1, cid).permutation(len(rows))
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
        n_clients, parts = self.num_clients, [[] for _ in range(self.num_clients)]
        if n_clients == 1:
            return [rows]
        if self.partition == "iid":
            order = seeded_rng(self.seed, FILES_STREAM, 2).permutation(len(rows))
            return [[rows[int(i)] for i in chunk] for chunk in np.array_split(order, n_clients)]
        groups: dict[str, list[Example]] = {}
        for ex in rows:
            groups.setdefault(ex["task"], []).append(ex)
        for g, name in enumerate(sorted(groups)):
            members = groups[name]
            order = seeded_rng(self.seed, FILES_STREAM, 3, zlib.crc32(name.encode())).permutation(len(members))
            if self.partition == "dirichlet":  # label-skew split: this task's rows go to clients ~ Dirichlet(alpha)
                props = seeded_rng(self.seed, FILES_STREAM, 4, zlib.crc32(name.encode())).dirichlet(
                    np.full(n_clients, self.alpha)
                )
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
        check(len(records) > 0, f"{path}: no rows")
        for col, what in ((self.prompt_column, "prompt"), (self.answer_column, "answer"), (self.task_column, "task")):
            check(col is None or col in columns, f"{path}: missing {what} column {col!r} (columns found: {columns})")
        return [self._example(path, i, rec) for i, rec in enumerate(records, start=1)]

    def _example(self, path: str, row: int, rec: dict[str, Any]) -> Example:
        where = f"{path}: row {row}"  # 1-based, as the JSON Lines line numbers (rows are data rows, no header)
        raw = rec.get(self.prompt_column)
        if isinstance(raw, str):
            check(raw.strip() != "", f"{where}, column {self.prompt_column!r}: empty prompt")
            prompt = chat_messages(self.system_prompt, raw)
        elif isinstance(raw, list | tuple):
            check(len(raw) > 0, f"{where}, column {self.prompt_column!r}: empty prompt")
            ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in raw)
            check(ok, f"{where}, column {self.prompt_column!r}: chat messages need 'role' and 'content' keys")
            prompt = [dict(m) for m in raw]
        else:
            check(raw is not None, f"{where}, column {self.prompt_column!r}: empty prompt")
            raise ValueError(f"{where}, column {self.prompt_column!r}: prompt must be a string or a list of messages")
        answer = rec.get(self.answer_column)
        check(answer is not None, f"{where}, column {self.answer_column!r}: missing answer")
        answer = answer if isinstance(answer, str) else json.dumps(json_safe(answer))
        if self.task_column is not None:
            check(rec.get(self.task_column) is not None, f"{where}, column {self.task_column!r}: missing task")
            task = str(rec[self.task_column])
        else:
            task = Path(path).stem
        meta, rg_entry = rec.get("metadata"), None
        if isinstance(raw, str) and isinstance(meta, dict) and str(meta.get("source_dataset")) in DATASETS:
            # rows exported from reasoning-gym keep their verifier
            rg_entry = json_safe({"question": raw, "answer": answer, "metadata": meta})
        skip = {self.prompt_column, self.answer_column, *RESERVED_COLUMNS}
        extras = {k: v for k, v in rec.items() if k not in skip}
        return {**extras, "prompt": prompt, "answer": answer, "task": task, "rg_entry": rg_entry}


def _prompt_key(prompt: list[dict[str, Any]]) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)


def _read_json_records(path: str) -> list[dict[str, Any]]:
    """Read JSON Lines (or, for .json, a top-level array of objects), naming the line of any bad record."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = Path(path).read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if Path(path).suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from err
        lines = [(i, item) for i, item in enumerate(items, start=1)]
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
        check(isinstance(item, dict), f"{path}: {label} {n} is not a JSON object")
    return [item for _, item in lines]
