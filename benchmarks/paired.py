"""Seeds, paired held-out scoring and untrained families for the learning benchmarks (heterogeneous, fedppo, fedgrpo).

Each benchmark trains methods on the same data and compares their final adapters. This module is what they share:

* **Seeds.** A seed fixes the data (every client's train split and held-out prompts) and the training randomness
  (module, trainer, sampling). Within a seed every method sees the same train and held-out prompts, so methods are
  compared pairwise on identical prompts; other seeds draw other prompts and other sampling.
* **Per-prompt correctness.** After training, the benchmark's final adapter(s) (the global adapter; each client's
  own for local-only and personalized methods) score every held-out prompt greedily (``accuracy_func >= 1``, as
  ``fedrl_lightning.client.evaluate``), keeping the 0/1 vector. The trainer itself is given no held-out split, so
  it evaluates nothing and nothing is scored twice. The base model (the untrained adapter) is scored once per seed.
* **Untrained families.** The final adapters (each distinct one) and the base also score ``UNTRAINED_FAMILIES``,
  reasoning-gym families no client trained on, on prompts fixed across seeds (``UNTRAINED_SEED``): skill lost (or
  gained) elsewhere.
* **Statistics** (``fedrl_lightning.reporting``): per method and seed the accuracy pooled over the clients' held-out
  prompts with its 95% Wilson interval; over seeds the mean of the seeds' accuracies with the Wilson interval of all
  prompts pooled, and each seed's value; against each reference method (FedAvg, isolated PPO, ...) and the base,
  the exact two-sided McNemar test on the discordant prompts, pooled over clients and seeds, with the per-seed
  accuracy differences.
* **Accumulation.** ``<out>/<name>.json`` keys results by a hash of the budget (every argument but ``methods``,
  ``seeds``, ``out`` and ``force``), then by method and seed: a finished (method, seed) is skipped unless
  ``force``; the tables and PNG are rebuilt from every stored result of the budget. A file in an older format is
  kept under ``legacy``. Writes take a lock and merge, so processes running other methods may share the file.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib
from rich.console import Console
from rich.table import Table

from fedrl_lightning.stats import discordant_pairs, mcnemar_exact, wilson_interval

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Example = dict[str, Any]

# The four client families of the quickstart (NOTES, "Issue 23": the 135M base is at 9-30% greedy on each).
TASKS = ["basic_arithmetic", "chain_sum", "gcd", "simple_equations"]
TASK_KWARGS = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9},
}
GROUPS = [f"c{cid}:{task}" for cid, task in enumerate(TASKS)]
"""Held-out groups of the one-family-per-client benchmarks: client ``i`` and its family."""

# Families no benchmark client trains on (they train on basic_arithmetic, chain_sum, gcd, simple_equations), sized so
# that a 135M model answers some greedily within 32 tokens (small integer answers the verifier can take from the last
# number): two near the trained arithmetic (products, lcm), a word problem (leg_counting) and a non-arithmetic one
# (letter_counting).
UNTRAINED_FAMILIES = ["products", "lcm", "leg_counting", "letter_counting"]
UNTRAINED_KWARGS = {
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "lcm": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 12},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3},
    "letter_counting": {"min_words": 3, "max_words": 5},
}
UNTRAINED_SEED = 7_000_003
"""The untrained families' prompts are the same in every seed and budget (only their number varies)."""
BASE = "base"
"""The untrained model, scored once per seed; a pseudo-method (``--methods '[base]' --force true`` rescores it)."""


# -- scoring -----------------------------------------------------------------------------------------------------


def untrained_examples(families: Sequence[str], size: int) -> dict[str, list[Example]]:
    """``size`` held-out prompts of each family (fixed: ``UNTRAINED_SEED``), as the benchmarks' data builds them."""
    from fedrl_lightning.data import FederatedData

    if not families or size < 1:
        return {}
    data = FederatedData(
        tasks=list(families),
        task_kwargs={f: UNTRAINED_KWARGS[f] for f in families if f in UNTRAINED_KWARGS},
        num_clients=len(families),
        partition="by_task",
        train_size=1,
        eval_size=size,
        seed=UNTRAINED_SEED,
    )
    return {family: data.eval_examples(i) for i, family in enumerate(families)}


def client_data(cfg: Mapping[str, Any], seed: int, eval_size: int, client_columns: dict | None = None) -> Any:
    """``TASKS`` over four clients, one family each, ``rounds x local_steps x prompts_per_step`` train prompts per
    client. Training gets ``eval_size`` 0 (the trainer scores nothing; ``score_adapters`` does): the train splits do
    not depend on ``eval_size``, and the held-out prompts come from the same call with it."""
    from fedrl_lightning.data import FederatedData

    return FederatedData(
        tasks=TASKS,
        task_kwargs=TASK_KWARGS,
        num_clients=len(TASKS),
        partition="by_task",
        train_size=cfg["rounds"] * cfg["local_steps"] * cfg["prompts_per_step"],
        eval_size=eval_size,
        seed=seed,
        client_columns=client_columns,
    )


def client_held_out(cfg: Mapping[str, Any], seed: int, client_columns: dict | None = None) -> dict[str, list[Example]]:
    """Each client's ``eval_size`` held-out prompts of a seed, by ``GROUPS``."""
    data = client_data(cfg, seed, cfg["eval_size"], client_columns)
    return {group: data.eval_examples(cid) for cid, group in enumerate(GROUPS)}


def score(module: Any, rollout: Any, examples: list[Example], batch_size: int) -> tuple[str, float]:
    """Greedy per-prompt correctness of ``module``'s loaded adapter on ``examples`` (a string of ``0``/``1``, in
    order) and its mean weighted reward: ``fedrl_lightning.client.score_examples``, the trainer's own criterion."""
    from fedrl_lightning.client import score_examples

    correct, rewards = score_examples(module, rollout, examples, batch_size)
    reward = float(rewards.nanmean()) if len(rewards) else math.nan
    return "".join("1" if c else "0" for c in correct.tolist()), reward


@dataclass
class Trained:
    """What a benchmark's training run hands back for scoring.

    Attributes:
        module: the (set-up) policy module the adapters load into.
        rollout: its generation backend.
        adapters: held-out group -> the adapter deployed for it (the same object for a shared adapter).
        extra: numbers to report beside the accuracies (mean over seeds in the extras table), e.g. bytes per round.
        details: anything else to keep in the JSON (lists, per-client values).
    """

    module: Any
    rollout: Any
    adapters: dict[str, Any]
    extra: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def final_adapters(trainer: Any, groups: Sequence[str]) -> dict[str, Any]:
    """The adapter each held-out group's client deploys after ``trainer.fit``: the global adapter when there is one
    (FedAvg & co., centralized), else client ``i``'s own for the ``i``-th group (local-only, personalized), or the
    only client's for every group (a single trainer client, e.g. FedGRPO's server)."""
    shared = trainer.server.shared_state()
    if shared is not None:
        return dict.fromkeys(groups, shared)
    ids = trainer.data.client_ids()
    if len(ids) == 1:
        return dict.fromkeys(groups, trainer.client.own_adapter(ids[0]))
    if len(ids) != len(groups):
        raise ValueError(f"{len(groups)} held-out groups for {len(ids)} clients with their own adapters")
    return {g: trainer.client.own_adapter(cid) for cid, g in zip(ids, groups)}


def fit(
    module: Any,
    data: Any,
    aggregation: Any,
    num_rounds: int,
    local_steps: int,
    run_dir: Path,
    seed: int,
    groups: Sequence[str],
    **trainer_kwargs: Any,
) -> tuple[Any, Trained]:
    """Train ``module`` on ``data`` in a ``FederatedTrainer`` that evaluates nothing (the data has no held-out split;
    ``score_adapters`` scores the result); returns the trainer and the final adapters of ``groups``."""
    from fedrl_lightning.trainer import FederatedTrainer

    trainer = FederatedTrainer(
        num_rounds=num_rounds,
        local_steps=local_steps,
        aggregation=aggregation,
        eval_every=0,
        eval_before_training=False,
        output_dir=str(run_dir),
        seed=seed,
        **trainer_kwargs,
    )
    trainer.fit(module, data, ckpt_path=None)
    return trainer, Trained(trainer.module, trainer.rollout, final_adapters(trainer, groups))


def score_adapters(
    trained: Trained, held_out: Mapping[str, list[Example]], untrained: Mapping[str, list[Example]], batch_size: int
) -> dict[str, Any]:
    """Each group's held-out prompts under its adapter; every distinct adapter on every untrained family."""
    module, rollout = trained.module, trained.rollout
    record: dict[str, Any] = {"held_out": {}, "reward": {}, "untrained": {f: [] for f in untrained}}
    distinct: dict[int, Any] = {}
    for group, examples in held_out.items():
        adapter = trained.adapters[group]
        distinct.setdefault(id(adapter), adapter)
        module.load_trainable_state(dict(adapter))
        record["held_out"][group], record["reward"][group] = score(module, rollout, examples, batch_size)
    for adapter in distinct.values():
        module.load_trainable_state(dict(adapter))
        for family, examples in untrained.items():
            record["untrained"][family].append(score(module, rollout, examples, batch_size)[0])
    return record


def base_trained(module: Any) -> Trained:
    """A freshly built module as its own base: the untrained adapter (LoRA's B is zero) for every group."""
    from fedrl_lightning.rollout.hf import HFRollout

    return Trained(module, HFRollout(), {})


# -- the store ---------------------------------------------------------------------------------------------------


def config_key(cfg: Mapping[str, Any]) -> str:
    """A short stable hash of a budget (sorted JSON)."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def command_line() -> str:
    """How this process was started, as a shell line (stored with every result)."""
    return shlex.join(["python", *sys.argv])


def provenance(start: float) -> dict[str, Any]:
    """``command``, ``wall_s`` since ``start`` (a ``time.perf_counter()``) and ``finished``: what ``results_page.py``
    shows beside a benchmark's numbers; any benchmark adds them to its JSON."""
    return {"command": command_line(), "wall_s": time.perf_counter() - start, "finished": _now()}


class Store:
    """``<out>/<name>.json``: ``{"benchmark", "methods", "references", "latest", "configs": {key: entry}}`` with
    ``entry = {"config", "base": {seed: record}, "results": {method: {seed: record}}, "invocations": [...]}``.

    Every write re-reads the file under a lock and merges one record, so concurrent processes lose nothing.
    """

    def __init__(self, path: Path, name: str, methods: Sequence[str], references: Sequence[str]) -> None:
        self.path, self.name = path, name
        self.header = {"benchmark": name, "methods": list(methods), "references": list(references)}

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock.tmp"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self.read()
            yield doc
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.path)

    def read(self) -> dict[str, Any]:
        doc = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if doc and "configs" not in doc:  # an older format: kept, never mixed with these results
            doc = {"legacy": doc}
        return {**doc, **self.header, "configs": doc.get("configs", {})}

    def entry(self, doc: Mapping[str, Any], key: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return doc["configs"].get(key) or {"config": dict(cfg), "base": {}, "results": {}, "invocations": []}

    def put(self, key: str, cfg: Mapping[str, Any], method: str, seed: int, record: Mapping[str, Any]) -> None:
        with self._locked() as doc:
            entry = doc["configs"][key] = self.entry(doc, key, cfg)
            where = entry["base"] if method == BASE else entry["results"].setdefault(method, {})
            where[str(seed)] = dict(record)
            doc["latest"] = key

    def log_invocation(self, key: str, cfg: Mapping[str, Any], invocation: Mapping[str, Any]) -> None:
        with self._locked() as doc:
            entry = doc["configs"][key] = self.entry(doc, key, cfg)
            entry["invocations"].append(dict(invocation))
            doc["latest"] = key


# -- the driver --------------------------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """One learning benchmark as the driver sees it.

    Attributes:
        name: file stem of its JSON and PNG.
        methods: every method, in display order.
        references: methods every other one is compared with (paired McNemar), e.g. ``("fedavg",)``.
        held_out: ``(cfg, seed) -> {group: examples}``: the held-out prompts, the same for every method of a seed.
        train: ``(method, cfg, seed, run_dir) -> Trained``: one training run from a fresh module.
        base_module: ``(cfg, seed) -> module``: a fresh policy module (its untrained adapter is the base).
        title: the table's title.
    """

    name: str
    methods: Sequence[str]
    references: Sequence[str]
    held_out: Callable[[dict[str, Any], int], dict[str, list[Example]]]
    train: Callable[[str, dict[str, Any], int, Path], Trained]
    base_module: Callable[[dict[str, Any], int], Any]
    title: str


def check_untrained(families: Sequence[str], trained_tasks: Sequence[str]) -> None:
    overlap = sorted(set(families) & set(trained_tasks))
    if overlap:
        raise ValueError(f"untrained_families {overlap} are trained on by a client; choose others")


def run(
    bench: Benchmark,
    cfg: dict[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str,
    force: bool = False,
) -> dict[str, Any]:
    """Run every missing (method, seed) of ``methods`` x ``seeds`` (all with ``force``), then print and plot the
    budget's stored results. Returns the summary (``summarize``)."""
    unknown = sorted(set(methods) - {*bench.methods, BASE})
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {[*bench.methods, BASE]}")
    out_dir = Path(out)
    store = Store(out_dir / f"{bench.name}.json", bench.name, bench.methods, bench.references)
    key, start, ran, skipped = config_key(cfg), time.perf_counter(), [], []
    console = Console(width=200)
    untrained = untrained_examples(cfg["untrained_families"], cfg["untrained_size"])
    for seed in seeds:
        held_out = bench.held_out(cfg, seed)
        entry = store.entry(store.read(), key, cfg)
        base = entry["base"]
        if str(seed) not in base or (force and BASE in methods):
            console.rule(f"{bench.name}: base, seed {seed}")
            t0 = time.perf_counter()
            same = (b["untrained"] for b in base.values() if set(b["untrained"]) == set(untrained))
            known = None if force else next(same, None)
            trained = base_trained(bench.base_module(cfg, seed))
            trained.adapters = dict.fromkeys(held_out, trained.module.trainable_state())
            record = score_adapters(trained, held_out, {} if known else untrained, cfg["eval_batch_size"])
            record["untrained"] = known or record["untrained"]  # the base's untrained prompts do not depend on seed
            record.update(minutes=(time.perf_counter() - t0) / 60, command=command_line(), finished=_now())
            store.put(key, cfg, BASE, seed, record)
            ran.append(f"{BASE}/{seed}")
            del trained
            gc.collect()
        for method in (m for m in methods if m != BASE):
            if str(seed) in entry["results"].get(method, {}) and not force:
                console.print(
                    f"{bench.name}: {method}, seed {seed} already done with this budget (--force true reruns)"
                )
                skipped.append(f"{method}/{seed}")
                continue
            console.rule(f"{bench.name}: {method}, seed {seed}")
            run_dir = out_dir / f"{bench.name}_run" / f"{method}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            trained = bench.train(method, cfg, seed, run_dir)
            t1 = time.perf_counter()
            record = score_adapters(trained, held_out, untrained, cfg["eval_batch_size"])
            t2 = time.perf_counter()
            record.update(
                extra=trained.extra,
                details=trained.details,
                train_minutes=(t1 - t0) / 60,
                eval_minutes=(t2 - t1) / 60,
                minutes=(t2 - t0) / 60,
                command=command_line(),
                finished=_now(),
            )
            store.put(key, cfg, method, seed, record)
            ran.append(f"{method}/{seed}")
            del trained
            gc.collect()
    invocation = {"command": command_line(), "finished": _now(), "wall_s": time.perf_counter() - start}
    store.log_invocation(key, cfg, {**invocation, "ran": ran, "skipped": skipped})
    summary = summarize(store.read(), key)
    if not summary["rows"]:
        console.print(f"{bench.name}: nothing stored for budget {key} yet")
        return summary
    for table in rich_tables(summary, bench.title):
        console.print(table)
    plot(summary, out_dir / f"{bench.name}.png", bench.title)
    base = summary["rows"][0] if summary["rows"][0]["method"] == BASE else None
    zero = [f for f, acc in (base["untrained_families"] if base else {}).items() if acc == 0]
    if zero:
        console.print(f"[yellow]the base model gets no prompt of {zero} right: no skill there to lose; choose others")
    console.print(f"results: {store.path} (budget {key}), plot: {out_dir / f'{bench.name}.png'}")
    return summary


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- statistics --------------------------------------------------------------------------------------------------


def _bits(vector: str) -> list[int]:
    return [int(ch) for ch in vector]


def _held_out(record: Mapping[str, Any]) -> str:
    """A record's held-out vector, groups concatenated in their stored order."""
    return "".join(record["held_out"].values())


def _untrained_pairs(record: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[str, str]:
    """A record's untrained vectors (every adapter, every family) and the base's, aligned prompt by prompt."""
    mine, theirs = [], []
    for family, vectors in record["untrained"].items():
        reference = base["untrained"].get(family, [""])[0]
        for vector in vectors:
            if len(vector) == len(reference):
                mine.append(vector)
                theirs.append(reference)
    return "".join(mine), "".join(theirs)


def _rate(vectors: Sequence[str]) -> dict[str, Any]:
    k, n = sum(v.count("1") for v in vectors), sum(len(v) for v in vectors)
    low, high = wilson_interval(k, n) if n else (math.nan, math.nan)
    return {"k": k, "n": n, "acc": k / n if n else math.nan, "low": low, "high": high}


def _paired(mine: Mapping[str, str], theirs: Mapping[str, str]) -> dict[str, Any] | None:
    """McNemar over the seeds both have (vectors concatenated), with each seed's accuracy difference."""
    seeds = [s for s in mine if s in theirs and len(mine[s]) == len(theirs[s]) and mine[s]]
    if not seeds:
        return None
    b = c = 0
    diffs = {}
    for s in seeds:
        bs, cs = discordant_pairs(_bits(mine[s]), _bits(theirs[s]))
        b, c = b + bs, c + cs
        diffs[s] = (bs - cs) / len(mine[s])
    n = sum(len(mine[s]) for s in seeds)
    return {"seeds": seeds, "b": b, "c": c, "n": n, "diff": (b - c) / n, "p": mcnemar_exact(b, c), "per_seed": diffs}


def summarize(doc: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
    """Everything the tables and the plot show, for one budget (default: the latest run)."""
    key = key or doc.get("latest")
    entry = doc["configs"][key]
    base, results = entry["base"], entry["results"]
    methods = [m for m in doc["methods"] if m in results] + sorted(set(results) - set(doc["methods"]))
    references = [r for r in doc["references"] if r in results]
    rows = []
    for method in [BASE, *methods]:
        records = base if method == BASE else results[method]
        if not records:
            continue
        seeds = sorted(records, key=int)
        held = {s: _held_out(records[s]) for s in seeds}
        row: dict[str, Any] = {
            "method": method,
            "seeds": seeds,
            "per_seed": {s: _rate([held[s]]) for s in seeds},
            "pooled": _rate(list(held.values())),
            "groups": _group_means(records, "held_out"),
            "untrained_families": _group_means(records, "untrained"),
            # the base's untrained vectors are one measurement, copied into every seed: counted once
            "untrained_pooled": _rate(
                [
                    v
                    for s in seeds[: 1 if method == BASE else None]
                    for vs in records[s]["untrained"].values()
                    for v in vs
                ]
            ),
            "minutes": _mean([records[s].get("minutes", math.nan) for s in seeds]),
            "extra": _extra_means(records),
        }
        row["mean"] = _mean([row["per_seed"][s]["acc"] for s in seeds])
        if method != BASE:
            base_held = {s: _held_out(base[s]) for s in seeds if s in base}
            row["vs_base"] = _paired(held, base_held)
            pairs = {s: _untrained_pairs(records[s], base[s]) for s in seeds if s in base}
            row["untrained_vs_base"] = _paired({s: p[0] for s, p in pairs.items()}, {s: p[1] for s, p in pairs.items()})
            row["vs"] = {
                ref: _paired(held, {s: _held_out(r) for s, r in results[ref].items()})
                for ref in references
                if ref != method
            }
        rows.append(row)
    return {"key": key, "config": entry["config"], "rows": rows, "references": references}


def _group_means(records: Mapping[str, Any], field_name: str) -> dict[str, float]:
    """Accuracy per held-out group or untrained family, pooled over seeds (and adapters)."""
    vectors: dict[str, list[str]] = {}
    for record in records.values():
        for group, value in record[field_name].items():
            vectors.setdefault(group, []).extend([value] if isinstance(value, str) else value)
    return {g: _rate(v)["acc"] for g, v in vectors.items()}


def _extra_means(records: Mapping[str, Any]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for record in records.values():
        for k, v in record.get("extra", {}).items():
            if isinstance(v, int | float):
                values.setdefault(k, []).append(float(v))
    return {k: _mean(v) for k, v in values.items()}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# -- tables and plot ---------------------------------------------------------------------------------------------


def _p(p: float) -> str:
    return "<1e-4" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def _cmp(test: Mapping[str, Any] | None) -> str:
    """``+0.062 (p=0.004)``."""
    if test is None:
        return "-"
    p = _p(test["p"])
    return f"{test['diff']:+.3f} (p{p if p.startswith('<') else '=' + p})"


def _acc(rate: Mapping[str, Any]) -> str:
    if not rate["n"]:
        return "-"
    return f"{rate['acc']:.3f} [{rate['low']:.2f}, {rate['high']:.2f}]"


def table_rows(summary: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables (title, header, rows) as strings: accuracies, paired comparisons, breakdown per group and
    family, and the benchmark's other numbers."""
    rows = summary["rows"]
    header = ["method", "seeds", "held-out acc (mean of seeds)", "95% Wilson, pooled", "per seed", "vs base"]
    header += ["untrained acc [95% Wilson]", "untrained vs base", "min per seed"]
    main = [
        [
            row["method"],
            str(len(row["seeds"])),
            f"{row['mean']:.3f}",
            _acc(row["pooled"]).split(" ", 1)[-1],
            " / ".join(f"{row['per_seed'][s]['acc']:.3f}" for s in row["seeds"]),
            _cmp(row.get("vs_base")) if row["method"] != BASE else "",
            _acc(row["untrained_pooled"]),
            _cmp(row.get("untrained_vs_base")) if row["method"] != BASE else "",
            f"{row['minutes']:.1f}",
        ]
        for row in rows
    ]
    paired_header = ["method", "against", "prompts", "acc difference", "b (only method)", "c (only against)"]
    paired_header += ["McNemar p", "difference per seed"]
    comparisons = []
    for row in rows:
        if row["method"] == BASE:
            continue
        tests = [(ref, row["vs"].get(ref)) for ref in summary["references"] if ref != row["method"]]
        tests += [("base", row["vs_base"]), ("base, untrained families", row["untrained_vs_base"])]
        for against, test in tests:
            if test is None:
                continue
            per_seed = " / ".join(f"{s}: {d:+.3f}" for s, d in test["per_seed"].items())
            cells = [row["method"], against, str(test["n"]), f"{test['diff']:+.3f}", str(test["b"]), str(test["c"])]
            comparisons.append([*cells, _p(test["p"]), per_seed])
    groups = list(rows[0]["groups"]) if rows else []
    families = list(rows[0]["untrained_families"]) if rows else []
    breakdown = [
        [row["method"], *(f"{row['groups'].get(g, math.nan):.3f}" for g in groups)]
        + [f"{row['untrained_families'].get(f, math.nan):.3f}" for f in families]
        for row in rows
    ]
    extra_keys = sorted({k for row in rows for k in row["extra"]})
    extras = [[row["method"], *(f"{row['extra'].get(k, math.nan):.4g}" for k in extra_keys)] for row in rows]
    tables = [
        ("held-out accuracy (greedy)", header, main),
        ("paired comparisons on identical prompts (pooled over clients and seeds)", paired_header, comparisons),
        (
            "accuracy per held-out group | per untrained family, pooled over seeds",
            [*header[:1], *groups, *families],
            breakdown,
        ),
    ]
    if extra_keys:
        tables.append(("other numbers, mean over seeds", ["method", *extra_keys], [r for r in extras if r[0] != BASE]))
    return tables


CAPTION = (
    "acc: correct / prompts, pooled over the held-out groups (clients; FedGRPO: domains) of a seed; the mean of the "
    "seeds' accuracies, the 95% Wilson interval of all seeds' prompts pooled, and each seed's. Paired: the accuracy "
    "difference against another method (or the base) on the same prompts, pooled over groups and seeds, with the "
    "exact two-sided McNemar p on its discordant prompts (b right only here, c right only there), and each seed's "
    "difference. Untrained: the families no client trained on, every distinct final adapter (each client's own for "
    "local-only and personalized methods) on the same prompts as the base."
)


def rich_tables(summary: Mapping[str, Any], title: str) -> list[Table]:
    tables = []
    for i, (name, header, rows) in enumerate(table_rows(summary)):
        table = Table(title=f"{title}: {name}" if i == 0 else name)
        for j, col in enumerate(header):
            table.add_column(col, justify="left" if j == 0 else "right")
        for row in rows:
            table.add_row(*row)
        if i == 0:
            table.caption = CAPTION + f" Budget {summary['key']}."
        tables.append(table)
    return tables


def markdown(summary: Mapping[str, Any]) -> str:
    """The tables as Markdown (``results_page.py``)."""
    parts = []
    for name, header, rows in table_rows(summary):
        lines = [f"**{name}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        parts.append("\n".join(lines))
    parts.append(CAPTION)
    return "\n\n".join(parts)


def plot(summary: Mapping[str, Any], path: Path, title: str) -> None:
    """Per-group accuracy (mean over seeds); pooled held-out and untrained accuracy with 95% Wilson intervals and
    each seed's value; the base as a dashed line."""
    rows = summary["rows"]
    if not rows:
        return
    methods = [r for r in rows if r["method"] != BASE]
    base = rows[0]
    groups = list(base["groups"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [g + i * width for g in range(len(groups))]
        style = {"color": "lightgray", "edgecolor": "black"} if row["method"] == BASE else {}
        axes[0].bar(xs, [row["groups"].get(g, math.nan) for g in groups], width, label=row["method"], **style)
    axes[0].set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    axes[0].set_ylabel("held-out accuracy (greedy), mean over seeds")
    axes[0].legend(fontsize=7, ncol=2)
    for ax, pooled, per_seed, label in (
        (axes[1], "pooled", lambda r: [r["per_seed"][s]["acc"] for s in r["seeds"]], "held-out accuracy"),
        (axes[2], "untrained_pooled", None, "untrained families' accuracy"),
    ):
        xs = range(len(methods))
        means = [r["mean"] if pooled == "pooled" else r[pooled]["acc"] for r in methods]
        low = [m - r[pooled]["low"] for m, r in zip(means, methods)]
        high = [r[pooled]["high"] - m for m, r in zip(means, methods)]
        ax.bar(xs, means, 0.6, yerr=[low, high], capsize=3, color=[f"C{i}" for i in xs])
        if per_seed is not None:
            for x, r in zip(xs, methods):
                ax.scatter([x] * len(r["seeds"]), per_seed(r), color="black", s=10, zorder=3)
        base_value = base["mean"] if pooled == "pooled" else base[pooled]["acc"]
        if math.isfinite(base_value):
            ax.axhline(base_value, color="black", ls="--", lw=1, label="base")
            ax.legend(fontsize=7)
        ax.set_xticks(list(xs), [r["method"] for r in methods], fontsize=7, rotation=30)
        ax.set_ylabel(label + " (95% Wilson)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title} (budget {summary['key']}; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
