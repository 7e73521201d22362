"""Watching a run: per-local-step rows in metrics.csv, completions.jsonl, loggers by name, progress, the plot."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
from rich.console import Console
from rich.progress import Progress

from conftest import make_data, make_module
from fedrl_lightning import reporting
from fedrl_lightning import trainer as trainer_module
from fedrl_lightning.aggregation import ClientUpdate, FedAvg
from fedrl_lightning.callbacks.watch import StepProgress
from fedrl_lightning.cli import main
from fedrl_lightning.errors import EXIT_USAGE
from fedrl_lightning.modules.policy import MetricTracker
from fedrl_lightning.trainer import FederatedTrainer
from fedrl_lightning.watch import StepLog, pack_steps, pop_steps

LOCAL_STEPS = 3
COMPLETIONS_PER_STEP = 8  # make_module: 2 prompts x 4 generations


def _trainer(out: Path, **kw) -> FederatedTrainer:
    args = dict(
        num_rounds=2,
        local_steps=LOCAL_STEPS,
        aggregation=FedAvg(),
        output_dir=str(out),
        progress=False,
        eval_batch_size=4,
        eval_before_training=False,
    )
    args.update(kw)
    return FederatedTrainer(**args)


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_rows(out: Path) -> list[tuple[int, int, int]]:
    """(round, client, step) of metrics.csv's local-step rows."""
    return [(int(r["round"]), int(r["client"]), int(r["step"])) for r in rows(out) if r.get("client")]


def completions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """2 clients x 2 rounds x 3 local steps; step rows every 2nd step, completions every 3rd; progress on (into a
    buffer); the steps the plot received."""
    out = tmp_path_factory.mktemp("watch")
    trainer = _trainer(out, progress=True, log_every_n_steps=2, log_completions_every=3)
    trainer.console.file = buffer = io.StringIO()
    plotted = []

    def plot_run(history, path, steps=()):
        plotted.append(list(steps))
        return real_plot_run(history, path, steps)

    real_plot_run = trainer_module.plot_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "plot_run", plot_run)
        trainer.fit(make_module(), make_data())
    return SimpleNamespace(out=out, trainer=trainer, console=buffer.getvalue(), plotted=plotted)


def test_metrics_csv_has_a_row_per_logged_local_step_beside_the_round_rows(run):
    # the run's local steps 1..6 of each client; every 2nd is logged, before its round's row
    assert step_rows(run.out) == [(1, 0, 2), (1, 1, 2), (2, 0, 4), (2, 0, 6), (2, 1, 4), (2, 1, 6)]
    table = rows(run.out)
    assert [(r["round"], r["step"]) for r in table if not r["client"]] == [("1", ""), ("2", "")]
    assert [int(r["round"]) for r in table] == sorted(int(r["round"]) for r in table)
    first = next(r for r in table if r["client"])
    for key in ("reward", "loss", "learning_rate", "rewards/length_reward/mean", "timing/step"):
        assert first[key] != "", key
    assert float(first["learning_rate"]) == pytest.approx(1e-2)
    # the round rows are as before: no per-step key reaches them (nor the history, nor the aggregator)
    assert not any(k.startswith("local_step/") for h in run.trainer.history for k in h)
    assert "client0/reward" in run.trainer.history[-1]


def test_completions_jsonl_holds_every_nth_steps_scored_completions(run):
    logged = completions(run.out)
    assert len(logged) == 2 * 2 * COMPLETIONS_PER_STEP  # steps 3 and 6 of 2 clients
    assert {(c["round"], c["client"], c["step"]) for c in logged} == {(1, 0, 3), (1, 1, 3), (2, 0, 6), (2, 1, 6)}
    row = logged[0]
    assert row.keys() == {"round", "client", "step", "prompt", "completion", "reward", "rewards", "advantage"}
    assert isinstance(row["completion"], str) and row["prompt"]
    assert row["rewards"].keys() == {"length_reward"}
    assert row["reward"] == row["rewards"]["length_reward"] == len(row["completion"]) % 7
    assert all(math.isfinite(c["advantage"]) for c in logged)
    # the console shows a table of each logged step
    assert "completions: round 2, client 1, step 6" in run.console and "advantage" in run.console


def test_curves_png_gets_the_per_step_reward_panel(run):
    (steps,) = run.plotted
    assert sorted((c, s) for c, s, _ in steps) == [(0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6)]
    assert plt.imread(run.out / "curves.png").shape[1] > 1500  # three panels (two are 1210 px wide)


def test_a_resume_trims_step_rows_and_completions_of_rounds_after_the_checkpoint(run, tmp_path):
    out = tmp_path / "crashed"
    shutil.copytree(run.out, out)
    before_rows, before_completions = rows(out), completions(out)
    # round 2 logged, but its checkpoint never landed: a resume reruns it from round 1's
    shutil.rmtree(out / "checkpoints" / "round-000002")
    (out / "completions.jsonl").open("a").write('{"round": 2, "cli')  # and a torn last line
    resumed = _trainer(out, log_every_n_steps=2, log_completions_every=3)
    resumed.fit(make_module(), make_data())
    assert resumed.round_idx == 2
    after = rows(out)
    assert step_rows(out) == [(r, c, s) for r, c, s in step_rows(run.out)]  # no duplicates of round 2
    assert after[:3] == before_rows[:3]  # round 1 (two step rows and its row) kept as written
    assert len(after) == len(before_rows)
    logged = completions(out)
    assert logged[: 2 * COMPLETIONS_PER_STEP] == before_completions[: 2 * COMPLETIONS_PER_STEP]
    assert len(logged) == len(before_completions)


def test_metrics_csv_resume_drops_step_rows_after_the_checkpoint_and_restores_round_rows(tmp_path):
    logger = reporting.MetricsCSV(tmp_path)
    for r in (1, 2):
        logger.log_rows([{"round": r, "client": 0, "step": r, "reward": 0.5}])
        logger.log_metrics({"train/reward_mean": 0.5}, step=r)
        logger.save()
    logger.resume([{"round": 0, "eval/accuracy_mean": 0.1}, {"round": 1, "train/reward_mean": 0.5}])
    assert [(r["round"], r["client"]) for r in rows(tmp_path)] == [("0", ""), ("1", "0"), ("1", "")]
    assert logger.step_rewards() == [(0, 1, 0.5)]


def test_step_log_takes_per_step_metrics_out_of_updates_and_keeps_every_nth():
    update = ClientUpdate(3, {}, 2, metrics={"reward": 1.0, **pack_steps([{"reward": 0.0}, {"reward": 2.0}])})
    log = StepLog(every=2)
    log.collect(2, update)  # round 2 of 2 local steps: the run's steps 3 and 4
    assert update.metrics == {"reward": 1.0}
    assert log.pending == [{"round": 2, "client": 3, "step": 4, "reward": 2.0}]
    log.start_round()  # a retried round forgets the failed attempt's rows
    assert log.pending == []
    off = StepLog(every=0)
    off.collect(1, ClientUpdate(0, {}, 1, metrics=pack_steps([{"reward": 1.0}])))
    assert off.pending == []
    assert pop_steps({"timing/step": 1.0}) == []


def test_log_every_n_steps_zero_writes_round_rows_only(tmp_path):
    trainer = _trainer(tmp_path, num_rounds=1, local_steps=1, log_every_n_steps=0, loggers=["csv"])
    trainer.fit(make_module(), make_data())
    assert step_rows(tmp_path) == [] and len(rows(tmp_path)) == 1
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "completions.jsonl").exists()


def test_metric_tracker_window_is_one_steps_weighted_mean():
    tracker = MetricTracker()
    tracker.update("kl", 1.0, weight=3.0)
    tracker.update("kl", 3.0, weight=1.0)
    tracker.update("kl", float("nan"))
    assert tracker.window() == {"kl": 1.5}
    tracker.update("kl", 5.0)
    assert tracker.window() == {"kl": 5.0}
    assert tracker.compute_and_reset() == {"kl": pytest.approx((3 + 3 + 5) / 5)}  # the round's mean goes on


def test_an_unknown_logger_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown logger 'foo'; choose from csv, tensorboard, wandb, mlflow"):
        FederatedTrainer(output_dir=str(tmp_path), loggers=["csv", "foo"])
    code = None
    try:
        main(["fit", "-c", "configs/tiny.yaml", "--trainer.output_dir", str(tmp_path), "--trainer.loggers", "[foo]"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "unknown logger 'foo'" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_optional_logger_says_how_to_install_it(tmp_path, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda pkg, *a: None if pkg == name else real(pkg, *a))
    with pytest.raises(ValueError) as err:
        reporting.run_loggers(tmp_path, ["csv", name])
    assert str(err.value) == f"trainer.loggers: {name} is not installed: pip install 'fedrl-lightning[{name}]'"


def test_step_progress_advances_the_rounds_bar_within_a_round_and_shows_an_eta():
    bar = Progress(*reporting.progress_bar(None).columns, console=Console(file=io.StringIO()))
    rounds = bar.add_task("rounds", total=4, completed=1, done_before=1)  # resumed after round 1
    fabric = SimpleNamespace(global_rank=0, world_size=1)
    server, client = SimpleNamespace(bar=bar, fabric=fabric), SimpleNamespace(local_steps=2)
    progress = StepProgress()
    progress.on_round_start(server)
    progress.on_clients_selected(server, [0, 1])
    progress.on_client_start(client, 0)
    progress.on_local_step_end(client, 2, 0, {"reward": 0.25})
    task = bar.tasks[rounds]
    assert task.completed == pytest.approx(1.25)  # one of 2 steps of one of 2 clients of round 2
    assert bar.tasks[progress.task].fields["info"] == "reward 0.250"
    task.start_time -= 10  # 10 s for a quarter round: 2.75 rounds left take 110 s
    assert str(reporting.EtaColumn().render(task)) == "eta 0:01:50"
    progress.on_round_end()
    assert len(bar.tasks) == 1
