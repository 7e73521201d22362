"""A user's rows as per-client train/eval splits: row -> example conversion, partitioning, the eval hold-out.

Shared by local files (``files.LocalFiles``) and ``datasets`` objects or Hub names (``user.DatasetRows``). A single
table is split over the clients by ``partition``: ``iid`` even random shares; ``by_task`` the distinct values of the
``partition_by`` column dealt to the clients round-robin (sorted; client i gets values i, i + n, ...; with fewer
values than clients, the clients sharing a value split its rows); ``dirichlet`` each value's rows over the clients
in Dirichlet(alpha) proportions. A held-out table (a ``test``/``validation`` split) is dealt the same way, so each
client evaluates on its own values; without one, ``eval_fraction`` of each client's rows is held out.

Prompts keep TRL's format: a string stays a string (tokenized as is, no chat template) unless a ``system_prompt``
opts the data in, which makes it ``[system, user]`` messages; a list of messages is used as is (the system prompt,
if any, is prepended when it has none). Every other column rides along, so reward functions receive it as a keyword
argument, as TRL passes them.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from reasoning_gym.factory import DATASETS

from fedrl_lightning.data.common import (
    FILES_STREAM,
    RESERVED_COLUMNS,
    REWARD_ARGUMENTS,
    Example,
    chat_messages,
    check,
    json_safe,
    seeded_rng,
)


@dataclass
class Table:
    """Rows read from one place.

    Attributes:
        name: where the rows come from, for error messages (a path, or a dataset and its split).
        label: the task label of rows without a ``partition_by`` (or ``task``) value, e.g. the file's stem.
        records: the rows, as plain dicts.
        columns: the column names, in order.
    """

    name: str
    label: str
    records: list[dict[str, Any]]
    columns: list[str]


Split = tuple[list[Example], list[Example]]


class UserRows:
    """Per-client (train, eval) examples from a user's tables; subclasses read the tables (``build_clients``)."""

    def __init__(
        self,
        num_clients: int,
        partition: str,
        alpha: float,
        seed: int,
        eval_fraction: float,
        prompt_column: str,
        answer_column: str | None,
        partition_by: str | None,
        system_prompt: str | None,
    ) -> None:
        """Store the conversion and partition settings.

        Args:
            num_clients: number of federated clients.
            partition: ``by_task``, ``dirichlet`` or ``iid`` (see the module docstring).
            alpha: Dirichlet concentration of the ``dirichlet`` partition.
            seed: base seed of the partition and the shuffles.
            eval_fraction: fraction of each client's rows held out for eval when there is no held-out table.
            prompt_column: column holding the prompt: a string or a list of chat messages.
            answer_column: column holding the reference answer; None = the data has none (``answer`` is None).
            partition_by: column whose values ``by_task``/``dirichlet`` partition by; None labels rows by their
                ``task`` column if they have one, else by the table's label.
            system_prompt: system message for every prompt; None or empty adds none (string prompts stay strings).
        """
        self.num_clients, self.partition, self.alpha, self.seed = num_clients, partition, alpha, seed
        self.eval_fraction, self.system_prompt = eval_fraction, system_prompt or None
        self.prompt_column, self.answer_column, self.partition_by = prompt_column, answer_column, partition_by

    def build_clients(self) -> dict[int, Split]:
        """Every client's (train, eval) examples; a subclass reads its tables and calls ``split_tables``."""
        raise NotImplementedError

    def check_partition(self, what: str) -> None:
        """A single table split by value needs the ``partition_by`` column (``what`` names the table)."""
        if self.num_clients > 1 and self.partition != "iid":
            check(
                self.partition_by is not None,
                f"partition={self.partition!r} of {what} needs partition_by (the column whose values go to different "
                "clients); set partition_by or use partition='iid'",
            )

    # -- rows -> examples ----------------------------------------------------------------------------------------

    def examples(self, table: Table) -> list[Example]:
        """The table's rows as examples, after checking its columns."""
        check(len(table.records) > 0, f"{table.name}: no rows")
        for col, what in (
            (self.prompt_column, "prompt"),
            (self.answer_column, "answer"),
            (self.partition_by, "partition_by"),
        ):
            hint = "; answer_column=None if the data has no answers" if what == "answer" else ""
            check(
                col is None or col in table.columns,
                f"{table.name}: missing {what} column {col!r} (columns found: {table.columns}){hint}",
            )
        clash = [c for c in table.columns if c in REWARD_ARGUMENTS]
        check(not clash, f"{table.name}: columns {clash} clash with the reward function arguments; rename them")
        return [self.example(table, i, rec) for i, rec in enumerate(table.records, start=1)]

    def example(self, table: Table, row: int, rec: dict[str, Any]) -> Example:
        """One row as an example (``row`` is 1-based, as JSON Lines line numbers)."""
        where = f"{table.name}: row {row}"
        raw = rec.get(self.prompt_column)
        if isinstance(raw, str):
            check(raw.strip() != "", f"{where}, column {self.prompt_column!r}: empty prompt")
            system = self.system_prompt
            prompt: str | list[dict[str, Any]] = raw if system is None else chat_messages(system, raw)
        elif isinstance(raw, list | tuple):
            check(len(raw) > 0, f"{where}, column {self.prompt_column!r}: empty prompt")
            ok = all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in raw)
            check(ok, f"{where}, column {self.prompt_column!r}: chat messages need 'role' and 'content' keys")
            prompt = [dict(m) for m in raw]
            if self.system_prompt is not None and prompt[0]["role"] != "system":
                prompt.insert(0, {"role": "system", "content": self.system_prompt})
        else:
            check(raw is not None, f"{where}, column {self.prompt_column!r}: empty prompt")
            raise ValueError(f"{where}, column {self.prompt_column!r}: prompt must be a string or a list of messages")
        answer = None
        if self.answer_column is not None:
            answer = rec.get(self.answer_column)
            check(answer is not None, f"{where}, column {self.answer_column!r}: missing answer")
            answer = answer if isinstance(answer, str) else json.dumps(json_safe(answer))
        if self.partition_by is not None:
            check(rec.get(self.partition_by) is not None, f"{where}, column {self.partition_by!r}: missing value")
            task = str(rec[self.partition_by])
        else:  # the row's own task column, when it has one, names its task (as reasoning-gym rows do)
            task = str(rec["task"]) if rec.get("task") is not None else table.label
        meta, rg_entry = rec.get("metadata"), None
        if isinstance(raw, str) and isinstance(meta, dict) and str(meta.get("source_dataset")) in DATASETS:
            # rows exported from reasoning-gym keep their verifier
            rg_entry = json_safe({"question": raw, "answer": answer, "metadata": meta})
        extras = {k: v for k, v in rec.items() if k not in RESERVED_COLUMNS}  # the prompt/answer columns' own names too
        return {**extras, "prompt": prompt, "answer": answer, "task": task, "rg_entry": rg_entry}

    # -- partition and hold-out ----------------------------------------------------------------------------------

    def split_tables(self, tables: list[Table], held_out: Table | None = None) -> dict[int, Split]:
        """(train, eval) per client from one table per client, or one table partitioned over the clients.

        ``held_out`` (one partitioned table only) is dealt to the clients like the train rows and is their eval
        split; without it each client holds out ``eval_fraction`` of its rows.

        Raises:
            ValueError: unreadable rows, missing columns, or a client left without train rows.
        """
        evals: list[list[Example]] | None = None
        if len(tables) == self.num_clients:
            owned = [(t.name, self.examples(t)) for t in tables]
        else:
            rows = self.examples(tables[0])
            names = sorted({ex["task"] for ex in rows})
            owned = [(tables[0].name, part) for part in self.partition_rows(rows, names)]
            if held_out is not None:
                evals = self.partition_rows(self.examples(held_out), names, split=1)
        out = {}
        for cid, (name, rows) in enumerate(owned):
            shuffled = _shuffled(rows, self.seed, cid)
            if evals is None:
                n_eval = min(round(len(rows) * self.eval_fraction), max(len(rows) - 1, 0))
                train, held = shuffled[n_eval:], shuffled[:n_eval]
            else:
                train, held = shuffled, _shuffled(evals[cid], self.seed, cid, 1)
            if not train:
                raise ValueError(
                    f"Client {cid} has no train rows from {name} (partition={self.partition!r}, alpha={self.alpha}); "
                    "add rows, use fewer clients, or raise alpha"
                )
            train_keys = {_prompt_key(ex["prompt"]) for ex in train}
            out[cid] = (train, [ex for ex in held if _prompt_key(ex["prompt"]) not in train_keys])
        return out

    def partition_rows(self, rows: list[Example], names: list[str], split: int = 0) -> list[list[Example]]:
        """``rows`` over the clients; ``names`` are the train split's task values, which fix who owns which value."""
        n_clients = self.num_clients
        parts: list[list[Example]] = [[] for _ in range(n_clients)]
        if n_clients == 1:
            return [rows]
        tail = (split,) if split else ()  # the train split keeps the streams it always had
        if self.partition == "iid":
            order = seeded_rng(self.seed, FILES_STREAM, 2, *tail).permutation(len(rows))
            return [[rows[int(i)] for i in chunk] for chunk in np.array_split(order, n_clients)]
        groups: dict[str, list[Example]] = {}
        for ex in rows:
            groups.setdefault(ex["task"], []).append(ex)
        shared = len(names) <= n_clients
        extra = sorted(set(groups) - set(names))  # values only in a held-out split: dealt on after the train's
        for g, name in enumerate(names + extra):
            members = groups.get(name, [])
            key = zlib.crc32(name.encode())
            order = seeded_rng(self.seed, FILES_STREAM, 3, key, *tail).permutation(len(members))
            if self.partition == "dirichlet":  # label skew: this value's rows go to clients ~ Dirichlet(alpha)
                # the same proportions for train and held-out rows, so each client evaluates on its own mixture
                props = seeded_rng(self.seed, FILES_STREAM, 4, key).dirichlet(np.full(n_clients, self.alpha))
                cuts = (np.cumsum(props)[:-1] * len(members)).astype(int)
                owners, chunks = list(range(n_clients)), np.split(order, cuts)
            else:  # by_task: value g goes to client g % C; clients sharing a value split its rows
                if shared and g < len(names):
                    owners = [c for c in range(n_clients) if c % len(names) == g]
                else:
                    owners = [g % n_clients]
                chunks = np.array_split(order, len(owners))
            for owner, chunk in zip(owners, chunks):
                parts[owner] += [members[int(i)] for i in chunk]
        return parts


def _shuffled(rows: list[Example], seed: int, client_id: int, *tail: int) -> list[Example]:
    order = seeded_rng(seed, FILES_STREAM, 1, client_id, *tail).permutation(len(rows))
    return [rows[int(i)] for i in order]


def _prompt_key(prompt: str | list[dict[str, Any]]) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)
