"""A thousand clients on one machine: peak RSS and round time as the number of registered clients grows.

    python benchmarks/scale.py                                # 10, 100, 1000 clients, embedded model, 3 rounds
    python benchmarks/scale.py --clients 10 1000 --resume-check
    python benchmarks/scale.py --repeats 3                    # each count 3 times, interleaved: median round time
    python benchmarks/scale.py --quick --clients 10 20        # smoke test: tiny random model, seconds per count

Every count is one federated run in its own process, one after the other (never two at once: the cores are the
measurement): the embedded SmolLM2-135M (``--quick``: the tests' tiny random model), LoRA r=16, FedAvg, 8 clients
selected per round (``UniformSelector(count=8)``), 1 local step of 2 prompts x 4 completions of <= 24 tokens,
3 rounds, the clients' states on disk (``trainer.client_state_dir``), evaluation off (``eval_every=0``,
``eval_before_training=False``, ``eval_size=0``). Each client's data is tiny (2 train prompts of one
reasoning-gym family) and is built before the run, so the data-setup time is reported apart from the rounds.
Only *which* clients are registered changes between counts; the work per round should not.

Per count: peak RSS (``VmHWM`` of the process, start to finish; and per round, reset at each round's start through
``/proc/self/clear_refs``), RSS after setup, each round's wall time (from its start to the end of its checkpoint,
measured by a callback) split into training (``timing/round_train``), evaluation and checkpoint, the data-setup
time, and the disk bank's size (allocated blocks and apparent size). The trainer cannot turn off the evaluation
after the last round (``Server.is_eval_round``); it walks every registered client (skipping those without held-out
prompts: all of them here), so it is reported as ``final eval`` and left out of the round time the targets compare
(mean of rounds 2..R; round 1 includes warm-up). Targets (the issue): peak RSS at the largest count <= 1.2x at the
smallest, round time <= 1.1x. On 2 shared cores the round time varies by tens of percent between runs: compare
counts on a quiet machine, with ``--repeats``.

``--resume-check`` (at ``--resume-clients``, default the largest count): the straight run is compared with a run
SIGKILLed in round 2 after its first client, then resumed from its last checkpoint and bank: the final global
adapter must be bitwise equal, and so must the trained clients' stored states and the metrics (timings aside).

Writes ``benchmarks/results/scale.json`` and ``scale.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from procmem import reset_peak, status_mb

MB = 2**20
TARGET_RSS, TARGET_TIME = 1.2, 1.1


# -- measurement helpers (run in the child) ------------------------------------------------------------------------


def _reset_peak() -> bool:
    """Start ``VmHWM`` over from the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        reset_peak()
        return True
    except OSError:
        return False


def _dir_size(path: Path, pattern: str = "*") -> tuple[int, int, int]:
    """(allocated bytes, apparent bytes, files) of the files under ``path`` matching ``pattern``: a sparse row file
    takes blocks only for the rows written."""
    allocated = apparent = files = 0
    for p in path.rglob(pattern) if path.exists() else ():
        if p.is_file():
            st = p.stat()
            allocated, apparent, files = allocated + st.st_blocks * 512, apparent + st.st_size, files + 1
    return allocated, apparent, files


def _digest(obj: Any, h: Any = None) -> str:
    """sha256 of tensors' bytes (with dtype and shape) and of everything else's repr, in a fixed order."""
    import torch

    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)  # 0-dim (step counts) too
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, list | tuple):
        for item in obj:
            _digest(item, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Completion length in characters mod 7: differs within a group even for a random model, so every step moves
    the adapter and the resume check compares runs that trained."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 7) for t in texts]


class RoundRecorder:
    """Each round's wall time (start to end of its checkpoint), its evaluation and checkpoint seconds and its peak
    RSS; with ``kill_round``, SIGKILLs the process after the first client of that round (a crash mid-round)."""

    def __init__(self, kill_round: int | None = None) -> None:
        self.kill_round = kill_round
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.peak_mb = 0.0  # the process's peak over every period measured so far
        self.peak_setup_mb = self.rss_setup_mb = 0.0
        self.resets = True

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.current is not None:
                    self.current[name] += time.perf_counter() - start

        return timed

    def _close(self) -> None:
        """End the open round: its wall time and the peak RSS since its start (or since the process started)."""
        peak = status_mb("VmHWM")
        self.peak_mb = max(self.peak_mb, peak)
        if self.current is None:
            self.peak_setup_mb = peak
            return
        self.current["wall_s"] = time.perf_counter() - self.current.pop("start")
        self.current["peak_rss_mb"], self.current["rss_end_mb"] = peak, status_mb("VmRSS")
        self.rounds.append(self.current)
        self.current = None

    def on_fit_start(self, server: Any) -> None:
        self.rss_setup_mb = status_mb("VmRSS")  # model, optimizer, data and bank set up
        # Instance attributes: only this run's server is timed, nothing of the library changes.
        server.evaluate = self._wrap("eval_s", server.evaluate)
        server.save_checkpoint = self._wrap("checkpoint_s", server.save_checkpoint)

    def on_round_start(self, round_idx: int) -> None:
        self._close()  # a retried round closes its failed attempt
        self.resets = _reset_peak() and self.resets
        self.current = {"round": round_idx, "start": time.perf_counter(), "eval_s": 0.0, "checkpoint_s": 0.0}

    def on_clients_selected(self, client_ids: list[int]) -> None:
        self.current["selected"] = list(client_ids)

    def on_client_end(self, round_idx: int) -> None:
        if round_idx == self.kill_round:  # no cleanup, no handler: as the OOM killer or a pulled plug
            os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_end(self) -> None:
        self._close()


def _module_kwargs(quick: bool, seed: int) -> dict[str, Any]:
    from fedrl_lightning.rewards import reasoning_gym_reward

    common = dict(
        num_generations=4,
        prompts_per_step=2,
        micro_batch_size=8,
        reward_funcs=[reasoning_gym_reward, length_reward],
        reward_weights=[1.0, 0.1],
        accuracy_func=reasoning_gym_reward,
        dtype="float32",
        seed=seed,
    )
    if quick:  # the tests' tiny random model (2 layers, hidden 64)
        return dict(model="tiny-random", lora_r=4, lora_alpha=8, learning_rate=1e-2, max_completion_length=6, **common)
    return dict(model="embedded", lora_r=16, lora_alpha=32, learning_rate=3e-4, max_completion_length=24, **common)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One federated run of ``spec["clients"]`` registered clients in this process; returns what it measured."""
    start = time.perf_counter()
    import torch

    from fedrl_lightning.aggregation import FedAvg
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.modules import GRPOModule
    from fedrl_lightning.selection import UniformSelector
    from fedrl_lightning.trainer import FederatedTrainer

    n, run_dir, seed = spec["clients"], Path(spec["run_dir"]), spec["seed"]
    out: dict[str, Any] = {"clients": n, "import_s": time.perf_counter() - start}
    out["rss_after_imports_mb"] = status_mb("VmRSS")
    t = time.perf_counter()
    module = GRPOModule(**_module_kwargs(spec["quick"], seed))
    out["model_s"] = time.perf_counter() - t
    if spec.get("warmup"):  # only builds the model: the embedded one's first load converts it once, off the clock
        return out
    t = time.perf_counter()
    data = FederatedData(tasks=["basic_arithmetic"], num_clients=n, train_size=2, eval_size=0, seed=seed)
    data.prepare_data()
    data.setup("fit")  # every client's split now: the trainer's own setup then finds them built
    out["data_setup_s"] = time.perf_counter() - t
    out["rss_model_data_mb"] = status_mb("VmRSS")
    recorder = RoundRecorder(spec.get("kill_round"))
    selector = UniformSelector(count=min(spec["per_round"], n), seed=seed)
    trainer = FederatedTrainer(
        num_rounds=spec["rounds"],
        local_steps=1,
        aggregation=FedAvg(),
        selector=selector,
        callbacks=[recorder],
        eval_every=0,  # 0: only after the last round, which the trainer always evaluates
        eval_before_training=False,
        output_dir=str(run_dir / "run"),
        client_state_dir=str(run_dir / "bank"),
        accelerator="cpu",
        seed=seed,
        progress=False,  # its plan and summary tables list every registered client
    )
    t = time.perf_counter()
    trainer.fit(module, data, ckpt_path=spec.get("ckpt_path"))
    out["fit_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = max(recorder.peak_mb, status_mb("VmHWM"))
    out["peak_setup_mb"], out["rss_after_setup_mb"] = recorder.peak_setup_mb, recorder.rss_setup_mb
    out["rss_end_mb"], out["peak_resets"] = status_mb("VmRSS"), recorder.resets
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # reset with VmHWM: reference
    history = {int(h["round"]): h for h in trainer.history}
    for row in recorder.rounds:
        h = history.get(row["round"], {})
        row["train_s"] = h.get("timing/round_train", float("nan"))
        row["federated_overhead"] = h.get("timing/federated_overhead", float("nan"))
        row["round_s"] = row["wall_s"] - row["eval_s"]  # what the targets compare (see the module docstring)
    out["rounds"] = recorder.rounds
    later = [r for r in recorder.rounds if r["round"] > 1] or recorder.rounds  # round 1 includes warm-up
    for key in ("round_s", "wall_s", "train_s", "checkpoint_s"):
        out[f"mean_{key}"] = statistics.mean(r[key] for r in later) if later else float("nan")
    out["final_eval_s"] = sum(r["eval_s"] for r in recorder.rounds)
    out["peak_rounds_mb"] = max((r["peak_rss_mb"] for r in recorder.rounds), default=float("nan"))
    bank = trainer.client.bank
    allocated, apparent, files = _dir_size(run_dir / "bank")
    journal = _dir_size(run_dir / "bank", "undo-*.log")[0]
    out["bank"] = {
        "type": type(bank).__name__,
        "allocated_mb": allocated / MB,
        "apparent_mb": apparent / MB,
        "journal_allocated_mb": journal / MB,
        "files": files,
        "nbytes_mb": bank.nbytes() / MB,
    }
    checkpoints = sorted((run_dir / "run" / "checkpoints").glob("round-*"))
    out["checkpoint_mb"] = _dir_size(checkpoints[-1])[0] / MB if checkpoints else 0.0
    with open(run_dir / "run" / "metrics.csv") as f:  # a column per metric of every client that has trained
        out["metrics_columns"] = len(f.readline().split(","))
    # For the resume check: the final adapter, every trained client's stored state, the metrics without timings.
    out["global_sha256"] = {k: _digest(v) for k, v in trainer.global_state.items()}
    ids = data.client_ids()  # selection is seeded by (seed, round): a resumed run's round 1 is known too
    trained = sorted({c for r in range(1, spec["rounds"] + 1) for c in selector.select(r, ids)})
    out["client_state_sha256"] = {str(c): _digest(vars(trainer.client_states[c])) for c in trained}
    out["history"] = [{k: v for k, v in h.items() if "timing/" not in k} for h in trainer.history]
    out["threads"] = torch.get_num_threads()
    return out


# -- the parent --------------------------------------------------------------------------------------------------


def _run_child(spec: dict[str, Any], expect_kill: bool = False) -> dict[str, Any] | None:
    """``child(spec)`` in a fresh interpreter; its output goes to ``<run_dir>/child.log``."""
    run_dir = Path(spec["run_dir"])
    if spec.get("ckpt_path") is None:  # a new run: nothing of an earlier one in its directory
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    with open(run_dir / "child.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT
        )
    if expect_kill:
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run meant to be killed ended with {proc.returncode}: see {run_dir}/child.log")
        return None
    if proc.returncode != 0 or not result.exists():
        tail = (run_dir / "child.log").read_text()[-3000:]
        raise RuntimeError(f"{spec['clients']} clients failed ({proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value == value else "-"


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per count: the first run's details; over repeats the highest memory figures and the median times."""
    row = {k: v for k, v in runs[0].items() if k not in ("history", "client_state_sha256", "global_sha256")}
    highest = ("peak_rss_mb", "peak_rounds_mb", "peak_setup_mb", "rss_after_setup_mb")
    median = ("mean_round_s", "mean_wall_s", "mean_train_s", "mean_checkpoint_s", "final_eval_s", "data_setup_s")
    row.update({k: max(r[k] for r in runs) for k in highest})
    row.update({k: statistics.median(r[k] for r in runs) for k in median})
    row["repeats"] = [{k: r[k] for k in highest + median} for r in runs]
    return row


def _report(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 160  # a log file: the whole table, not cut at rich's default of 80 columns
    table = Table(title=title)
    cols = ("clients", "data setup s", "RSS set up MB", "peak RSS MB", "vs first", "RSS")
    cols += ("round s", "vs first", "time", "train s", "ckpt s", "final eval s", "bank MB used / apparent")
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        rss, t = row["rss_ratio"], row["time_ratio"]
        bank = row["bank"]
        table.add_row(
            str(row["clients"]),
            _fmt(row["data_setup_s"], 3),
            _fmt(row["rss_after_setup_mb"], 0),
            _fmt(row["peak_rss_mb"], 0),
            f"{rss:.3f}x",
            _verdict(rss, TARGET_RSS),
            _fmt(row["mean_round_s"], 2),
            f"{t:.3f}x",
            _verdict(t, TARGET_TIME),
            _fmt(row["mean_train_s"], 2),
            _fmt(row["mean_checkpoint_s"], 2),
            _fmt(row["final_eval_s"], 2),
            f"{bank['allocated_mb']:.0f} / {bank['apparent_mb']:.0f}",
        )
    console.print(table)
    for row in rows:
        rounds = ", ".join(
            f"r{r['round']} {r['wall_s']:.2f} s (train {r['train_s']:.2f}, ckpt {r['checkpoint_s']:.2f}, "
            f"eval {r['eval_s']:.2f}, peak {r['peak_rss_mb']:.0f} MB)"
            for r in row["rounds"]
        )
        first = " (run 1)" if len(row["repeats"]) > 1 else ""
        print(
            f"{row['clients']:>5} clients{first}: {rounds}; {row['bank']['type']}, "
            f"checkpoint {row['checkpoint_mb']:.1f} MB, metrics.csv {row['metrics_columns']} columns"
        )
    if any(row["bank"]["type"] != "DiskClientStateBank" for row in rows):
        print("note: client_state_dir did not give a DiskClientStateBank: the states were in RAM")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["clients"] for r in rows]
    fig, (ax_rss, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = rows[0]
    ax_rss.plot(xs, [r["peak_rss_mb"] for r in rows], marker="o", label="peak RSS")
    ax_rss.plot(xs, [r["rss_after_setup_mb"] for r in rows], marker=".", label="RSS after setup")
    ax_rss.axhline(TARGET_RSS * base["peak_rss_mb"], color="k", ls="--", lw=1, label=f"{TARGET_RSS}x peak at {xs[0]}")
    ax_rss.set_ylabel("MB")
    ax_time.plot(xs, [r["mean_round_s"] for r in rows], marker="o", label="round (2..R), final eval excluded")
    ax_time.plot(xs, [r["mean_train_s"] for r in rows], marker=".", label="of which training")
    ax_time.axhline(TARGET_TIME * base["mean_round_s"], color="k", ls="--", lw=1, label=f"{TARGET_TIME}x at {xs[0]}")
    ax_time.set_ylabel("seconds")
    top = max(TARGET_TIME * base["mean_round_s"], *(r["mean_round_s"] for r in rows))
    ax_time.set_ylim(0, 1.15 * top)
    ax_rss.set_ylim(0, 1.15 * max(TARGET_RSS * base["peak_rss_mb"], *(r["peak_rss_mb"] for r in rows)))
    for ax in (ax_rss, ax_time):
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("registered clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _resume_check(spec: dict[str, Any], straight: dict[str, Any] | None, work: Path, keep: bool) -> dict[str, Any]:
    """Straight run against one SIGKILLed in round 2 after its first client and then resumed: bitwise equal?"""
    if straight is None:
        straight = _run_child({**spec, "run_dir": str(work / "resume-straight")})
        _drop(work / "resume-straight", keep)
    killed = {**spec, "run_dir": str(work / "resume-killed")}
    print(f"resume check, {spec['clients']} clients: a run killed in round 2 after its first client ...", flush=True)
    _run_child({**killed, "kill_round": 2}, expect_kill=True)
    resumed = _run_child({**killed, "ckpt_path": "last"})
    _drop(work / "resume-killed", keep)
    a, b = straight["global_sha256"], resumed["global_sha256"]
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    sa, sb = straight["client_state_sha256"], resumed["client_state_sha256"]
    clients_differ = sorted(int(c) for c in sa.keys() | sb.keys() if sa.get(c) != sb.get(c))
    # NaN (the mean of no held-out metrics) is written alike on both sides, where NaN != NaN would not compare
    history_equal = json.dumps(straight["history"], sort_keys=True) == json.dumps(resumed["history"], sort_keys=True)
    check = {
        "clients": spec["clients"],
        "kill": "SIGKILL in round 2 after its first client",
        "resumed_rounds": [r["round"] for r in resumed["rounds"]],
        "adapter_tensors": len(a),
        "adapter_tensors_differing": differ,
        "client_states": len(sa),
        "client_states_differing": clients_differ,
        "history_equal": history_equal,
        "bitwise": bool(a) and not differ and not clients_differ and history_equal,
    }
    verdict = "PASS" if check["bitwise"] else "FAIL"
    print(
        f"resume check ({spec['clients']} clients): {verdict}: global adapter {len(a) - len(differ)}/{len(a)} "
        f"tensors bitwise equal, {len(sa) - len(clients_differ)}/{len(sa)} trained clients' stored states equal, "
        f"metrics {'equal' if history_equal else 'DIFFER'} (timings aside); resumed rounds {check['resumed_rounds']}"
    )
    return check


def _drop(run_dir: Path, keep: bool) -> None:
    """A finished run's directory goes unless kept: its bank holds tens of MB per client that trained."""
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="registered client counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=8, help="clients selected per round")
    parser.add_argument("--repeats", type=int, default=1, help="runs per count, the counts interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the tiny random test model (smoke test)")
    parser.add_argument("--resume-check", action="store_true", help="also check exact resume after a SIGKILL")
    parser.add_argument("--resume-clients", type=int, default=None, help="count for the check (default: largest)")
    parser.add_argument("--out", default="benchmarks/results/scale.json", help="JSON; the PNG goes beside it")
    parser.add_argument("--workdir", default=None, help="where the runs and banks go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # internal: this process is one run
        spec = json.loads(args.child)
        result = child(spec)
        (Path(spec["run_dir"]) / "result.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.rounds < 1 or args.per_round < 1 or args.repeats < 1 or min(args.clients) < 1:
        parser.error("--rounds, --per-round, --repeats and --clients must be >= 1")
    if args.resume_check and args.rounds < 3:
        parser.error("--resume-check kills a run in round 2 and needs --rounds >= 3")
    if Path(args.out).is_dir():  # a folder: the JSON goes inside it, under its usual name
        args.out = str(Path(args.out) / "scale.json")
    clients = sorted(set(args.clients))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedrl-scale-"))
    common = dict(rounds=args.rounds, per_round=args.per_round, seed=args.seed, quick=args.quick)
    load_before = os.getloadavg()[0]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in clients}
    try:
        # The embedded model's first load converts it once (~30 s, a transient peak): not in any measured run.
        _run_child({**common, "clients": 1, "run_dir": str(work / "warmup"), "warmup": True})
        _drop(work / "warmup", args.keep)
        for i in range(args.repeats):
            for n in clients:  # one at a time: a second run would share the cores being measured
                print(f"scale: {n} clients (run {i + 1}/{args.repeats}) ...", flush=True)
                run_dir = work / f"clients-{n}-{i}"
                runs[n].append(_run_child({**common, "clients": n, "run_dir": str(run_dir)}))
                _drop(run_dir, args.keep)
        rows = [_summarize(runs[n]) for n in clients]
        base = rows[0]
        for row in rows:
            row["rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            row["time_ratio"] = row["mean_round_s"] / base["mean_round_s"]
        model = "tiny-random" if args.quick else "embedded"
        title = (
            f"{model}: {args.per_round} of N clients per round, 1 local step, {args.rounds} rounds, states on disk; "
            f"round s = mean of rounds 2..{args.rounds}, final eval excluded"
            + (f", median of {args.repeats} runs (peak RSS: highest)" if args.repeats > 1 else "")
            + f"; targets vs the {clients[0]}-client run: peak RSS <= {TARGET_RSS}x, round <= {TARGET_TIME}x"
        )
        _report(rows, title)
        check = None
        if args.resume_check:
            n = args.resume_clients or clients[-1]
            straight = runs[n][0] if n in runs else None  # the measured run has the same settings: reused
            check = _resume_check({**common, "clients": n}, straight, work, args.keep)
        largest = rows[-1]
        result = {
            "model": model,
            "rounds": args.rounds,
            "clients_per_round": args.per_round,
            "local_steps": 1,
            "repeats": args.repeats,
            "module": {k: v for k, v in _module_kwargs(args.quick, args.seed).items() if "func" not in k},
            "data": {"tasks": ["basic_arithmetic"], "train_size": 2, "eval_size": 0},
            "threads": base["threads"],
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
            "targets": {"peak_rss_ratio": TARGET_RSS, "round_time_ratio": TARGET_TIME},
            "rss_ratio": largest["rss_ratio"],
            "time_ratio": largest["time_ratio"],
            "rss_pass": all(r["rss_ratio"] <= TARGET_RSS for r in rows),
            "time_pass": all(r["time_ratio"] <= TARGET_TIME for r in rows),
            "rows": rows,
            "resume_check": check,
        }
        from paired import provenance  # the command and wall time, as every benchmark records them

        result.update(provenance(start))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        _plot(rows, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if check is None or check["bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
