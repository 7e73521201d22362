"""Local JSONL/JSON/Parquet/CSV files as per-client train/eval splits: the file checks and readers.

One file per client, or a single file split over the clients by ``partition`` (see ``rows``, which converts, partitions
and holds out the rows of files and ``datasets`` objects alike). Each row becomes an example in TRL's format
(``common.Example``); its other columns ride along, so reward functions receive them as keyword arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedrl_lightning.data.common import check
from fedrl_lightning.data.rows import Split, Table, UserRows

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""The file types ``LocalFiles`` reads."""


class LocalFiles(UserRows):
    """Per-client train/eval examples read from local files (``FederatedData`` with ``data_files``)."""

    def __init__(self, files: list[str], **kwargs: Any) -> None:
        """Check that the files exist and fit the partition (rows are read on ``build_clients``).

        Args:
            files: one file per client, or a single file partitioned over the clients.
            **kwargs: the conversion and partition settings, see ``rows.UserRows``.

        Raises:
            ValueError: no files, a count other than 1 or ``num_clients``, a missing file or unsupported extension,
                or a single file partitioned by task without ``partition_by``.
        """
        super().__init__(**kwargs)
        self.files = files
        check(len(files) > 0, "data_files must list at least one file")
        check(
            len(files) in (1, self.num_clients),
            f"data_files must hold 1 file or num_clients={self.num_clients} files, got {len(files)}: {files}",
        )
        for f in files:
            check(
                Path(f).suffix.lower() in SUFFIXES,
                f"Unsupported data file extension: {f} (use .jsonl/.json/.parquet/.csv)",
            )
            check(Path(f).is_file(), f"Data file not found: {f}")
        if len(files) == 1:
            self.check_partition(f"the single data file {files[0]}")

    def build_clients(self) -> dict[int, Split]:
        """Every client's (train, eval) examples, built jointly (a single file's partition spans all clients).

        Raises:
            ValueError: unreadable rows, missing columns, or a client left without train rows.
        """
        return self.split_tables([read_table(f) for f in self.files])


def read_table(path: str) -> Table:
    """The rows of one file (by extension: Parquet, CSV, or JSON Lines / a JSON array of objects)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".csv"):
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow as pa
            import pyarrow.csv

            try:
                table = pyarrow.csv.read_csv(path)
            except pa.ArrowInvalid as err:  # e.g. a row with too many fields: Arrow's message names the row
                raise ValueError(f"{path}: invalid CSV: {str(err).splitlines()[0]}") from None
        columns, records = list(table.column_names), table.to_pylist()
    else:
        records, columns = _read_json_records(path), []
        for rec in records:
            columns += [k for k in rec if k not in columns]
    return Table(path, Path(path).stem, records, columns)


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
