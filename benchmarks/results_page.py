"""Build ``benchmarks/RESULTS.md`` from whatever JSON and PNG results are in ``benchmarks/results/``.

    python benchmarks/results_page.py                    # rewrite benchmarks/RESULTS.md
    python benchmarks/results_page.py --out /tmp/RESULTS.md --results /tmp/smoke

One section per JSON: the learning benchmarks (``heterogeneous``, ``fedppo``, ``fedgrpo``; ``paired.py``'s format)
get their tables for the latest budget, the budget itself, the commands that produced it with their wall times and
their plot; the speed and memory benchmarks (``vs_trl``, ``aggregation_memory``, ``logprob_memory``, ``repack``,
``scale``, then any other) get their key numbers: top-level scalars, one level of nested scalars, and a table of
each list of rows. Each section ends with a "Reading" for a person to write, between
``<!-- reading:<name> -->`` and ``<!-- /reading -->``: what is there is kept when the page is rebuilt.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jsonargparse import CLI

LEARNING = ("heterogeneous", "fedppo", "fedgrpo")
SPEED = ("vs_trl", "aggregation_memory", "logprob_memory", "repack", "scale")
READING = re.compile(r"<!-- reading:(?P<name>[\w.-]+) -->\n(?P<text>.*?)<!-- /reading -->", re.DOTALL)
PLACEHOLDER = "_Not written yet: what the numbers show, what they do not, and what to run next._\n"
MAX_ROWS, MAX_COLUMNS, MAX_SCALARS = 40, 12, 40


def readings(page: Path) -> dict[str, str]:
    """The hand-written "Reading" of each section of an existing page."""
    if not page.is_file():
        return {}
    return {m["name"]: m["text"] for m in READING.finditer(page.read_text())}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) if all(not isinstance(v, dict | list) for v in value) else "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _short_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 8 and all(_is_scalar(v) for v in value)


def _rows_table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if (_is_scalar(v) or _short_list(v)) and k not in columns]
    columns = columns[:MAX_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({MAX_ROWS} of {len(rows)} rows)")
    return "\n".join(lines)


def key_numbers(doc: dict[str, Any]) -> str:
    """A generic view of a JSON result: its scalars (one level deep) and a table per list of rows."""
    scalars: list[tuple[str, Any]] = []
    tables = []
    for key, value in doc.items():
        if key in ("command", "wall_s", "finished"):
            continue
        if _is_scalar(value) or _short_list(value):
            scalars.append((key, value))
        elif isinstance(value, dict):
            scalars += [(f"{key}.{k}", v) for k, v in value.items() if _is_scalar(v) or _short_list(v)]
            for k, v in value.items():
                if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                    tables.append((f"{key}.{k}", v))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            tables.append((key, value))
    parts = []
    if scalars:
        lines = ["| key | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars[:MAX_SCALARS]]
        if len(scalars) > MAX_SCALARS:
            lines.append(f"\n({MAX_SCALARS} of {len(scalars)} numbers; the rest in the JSON)")
        parts.append("\n".join(lines))
    parts += [f"**{name}**\n\n{_rows_table(rows)}" for name, rows in tables]
    return "\n\n".join(parts) or "(no numbers at the top of the JSON)"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def learning_section(name: str, doc: dict[str, Any]) -> str:
    """The tables of every budget of a ``paired.py`` JSON (the latest run's first), each with its budget and the
    commands that produced it."""
    if "configs" not in doc or not doc.get("latest"):
        config = doc.get("config", {})
        return (
            f"Stored in an older format (one seed, no paired statistics; budget {config}). Rerun "
            f"`python benchmarks/{name}.py` for the seeded, paired results (the old ones are kept under `legacy`)."
        )
    keys = [doc["latest"], *(k for k in doc["configs"] if k != doc["latest"])]
    return "\n\n".join(_budget_section(doc, key, latest=i == 0) for i, key in enumerate(keys))


def _budget_section(doc: dict[str, Any], key: str, latest: bool) -> str:
    from paired import markdown, summarize

    entry = doc["configs"][key]
    records = [r for m in entry["results"].values() for r in m.values()] + list(entry["base"].values())
    budget = ", ".join(f"{k}={_fmt(v)}" for k, v in entry["config"].items())
    parts = [
        f"### Budget `{key}`{' (the latest run; the plot is its)' if latest else ''}",
        f"{budget}.",
        f"Compute stored for this budget: {_minutes(60 * sum(r.get('minutes', 0.0) for r in records))} over "
        f"{len(records)} (method, seed) runs, base included.",
        markdown(summarize(doc, key)),
    ]
    invocations = entry.get("invocations", [])
    if invocations:
        lines = ["**Commands** (each run's own command is in the JSON, beside its record):", ""]
        for inv in invocations[-12:]:
            ran = ", ".join(inv.get("ran", [])) or "nothing new"
            lines.append(f"- `{inv['command']}`: {_minutes(inv['wall_s'])}, {inv.get('finished', '')}; ran {ran}")
        if len(invocations) > 12:
            lines.append(f"- ... and {len(invocations) - 12} earlier ones")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def speed_section(name: str, doc: dict[str, Any], path: Path) -> str:
    if "command" in doc:
        wall = f", {_minutes(doc['wall_s'])}" if "wall_s" in doc else ""
        command = f"Command: `{doc['command']}`{wall}, finished {doc.get('finished', '?')}."
    else:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
        command = f"Command: `python benchmarks/{name}.py` (assumed: not recorded in the JSON; written {mtime})."
    return command + "\n\n" + key_numbers(doc)


def build(results: Path, page: Path) -> str:
    """The page's Markdown; the "Reading" of each section comes from ``page`` when it exists."""
    kept = readings(page)
    names = sorted(p.stem for p in results.glob("*.json"))
    order = [n for n in (*LEARNING, *SPEED) if n in names] + [n for n in names if n not in LEARNING + SPEED]
    rel = os.path.relpath(results, page.parent)
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python benchmarks/results_page.py` from `{rel}/` (the tables and commands are rebuilt from "
        'the JSON files; only the "Reading" paragraphs are written by hand and kept across rebuilds).',
        "",
        "Contents: " + ", ".join(f"[{n}](#{n.replace('_', '-')})" for n in order),
        "",
    ]
    for name in order:
        path = results / f"{name}.json"
        doc = json.loads(path.read_text())
        lines += [f"## {name}", ""]
        if (results / f"{name}.png").is_file():
            lines += [f"![{name}]({rel}/{name}.png)", ""]
        lines += [learning_section(name, doc) if name in LEARNING else speed_section(name, doc, path), ""]
        lines += ["### Reading", "", f"<!-- reading:{name} -->", kept.get(name, PLACEHOLDER) + "<!-- /reading -->", ""]
    orphans = sorted(set(kept) - set(order))
    for name in orphans:  # a reading whose JSON is gone is kept, not lost
        lines += [f"## {name} (no JSON now)", "", f"<!-- reading:{name} -->", kept[name] + "<!-- /reading -->", ""]
    return "\n".join(lines)


def main(results: str = "benchmarks/results", out: str = "benchmarks/RESULTS.md") -> str:
    """Write ``out`` from the JSON and PNG files in ``results``."""
    page = Path(out)
    text = build(Path(results), page)
    page.write_text(text)
    print(f"wrote {page} ({len(text.splitlines())} lines)")
    return text


if __name__ == "__main__":
    CLI(main, as_positional=False)
