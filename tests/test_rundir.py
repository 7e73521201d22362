"""Nothing lost, nothing silent: output directories, exit codes, checkpoints and one-line errors (`fedrl fit`)."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import pytest
import torch

from fedrl_lightning import checkpoint, rundir
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.cli import main
from fedrl_lightning.errors import EXIT_STOPPED, EXIT_USAGE

TINY = "configs/tiny.yaml"


def bad_length_reward(prompts, completions, **kwargs):
    return [1.0]


class Crash(Callback):
    def on_client_start(self, client_id: int) -> None:
        raise RuntimeError(f"client {client_id} crashed")


class Counter(Callback):
    """A callback with state, added on resume."""

    def __init__(self) -> None:
        self.rounds = 0

    def on_round_end(self, round_idx: int) -> None:
        self.rounds += 1

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"]


def fit(out: Path, *extra: str) -> int:
    """``fedrl fit`` on the tiny config into ``out``; its exit code."""
    try:
        main(["fit", "-c", TINY, "--trainer.output_dir", str(out), *extra])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-round tiny run."""
    out = tmp_path_factory.mktemp("finished")
    assert fit(out) == 0
    return out


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): digest(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_rerunning_a_finished_run_changes_nothing(finished, capsys):
    before = snapshot(finished)
    assert fit(finished) == 0
    assert "already finished at round 2" in capsys.readouterr().err
    assert snapshot(finished) == before  # metrics.csv, adapter/, checkpoints, config.yaml byte-identical


def test_ckpt_path_null_into_a_used_directory_neither_deletes_nor_adopts(finished, capsys):
    before = snapshot(finished)
    assert fit(finished, "--ckpt_path", "null") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds the checkpoints of an earlier run" in err and "Traceback" not in err
    assert snapshot(finished) == before


def test_changed_hyperparameters_refuse_to_resume_naming_the_key(finished, capsys):
    before = snapshot(finished)
    assert fit(finished, "--trainer.num_rounds", "3", "--model.init_args.learning_rate", "0.5") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "model.init_args.learning_rate: 0.001 -> 0.5" in err and "Traceback" not in err
    assert snapshot(finished) == before  # config.yaml is not overwritten either


def test_a_second_run_into_a_held_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    with rundir.RunLock(tmp_path):
        assert fit(tmp_path) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"in use by another run (PID {__import__('os').getpid()})" in err
    assert not (tmp_path / "checkpoints").exists()


def test_resume_appends_to_metrics_csv_and_a_new_callback_starts_fresh(tmp_path, caplog):
    assert fit(tmp_path, "--trainer.num_rounds", "1") == 0
    first = (tmp_path / "metrics.csv").read_text().splitlines()
    with caplog.at_level(logging.WARNING):
        code = fit(tmp_path, "--trainer.num_rounds", "2", "--trainer.callbacks+", f"{__name__}.Counter")
    assert code == 0 and "no state for callback Counter" in caplog.text
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    # round 2 appended (a local-step row per client, then the round's); rounds 0-1 kept as written
    assert rows[: len(first)] == first and len(rows) == len(first) + 3
    state = checkpoint.load(checkpoint.latest_valid(tmp_path / "checkpoints"))
    assert state["server"]["callbacks"]["Counter"] == {"rounds": 1}


@pytest.mark.parametrize(
    "case",
    [
        ["--model.init_args.reward_funcs", f"[{__name__}.bad_length_reward]", "--model.init_args.reward_weights=[1]"],
        ["--trainer.client_timeout", "1e-9"],  # every client times out
        ["--trainer.callbacks+", f"{__name__}.Crash"],  # every client crashes
    ],
    ids=["reward-wrong-length", "all-time-out", "all-fail"],
)
def test_runs_that_trained_nothing_exit_non_zero_and_export_nothing(tmp_path, capsys, case):
    assert fit(tmp_path, "--trainer.eval_before_training", "false", *case) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "stopped after round 0 of 2" in err and "no adapter written" in err
    assert not (tmp_path / "adapter").exists() and not list((tmp_path / "checkpoints").glob("round-*"))


def nan_reward(prompts, completions, **kwargs):
    return ([float("nan"), float("inf")] + [1.0] * len(completions))[: len(completions)]


def all_nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def test_non_finite_rewards_are_counted_warned_and_stop_the_run_when_everywhere(tmp_path, caplog):
    from fedrl_lightning.rewards import compute_rewards

    with caplog.at_level(logging.WARNING):
        rewards, errors = compute_rewards([nan_reward], ["p"] * 4, ["c"] * 4, {})
    assert errors == {"nan_reward": 2} and "returned 2 non-finite values of 4" in caplog.text
    assert torch.isnan(rewards[:2, 0]).all() and rewards[2:, 0].tolist() == [1.0, 1.0]
    reward = ["--model.init_args.reward_funcs", f"[{__name__}.all_nan_reward]", "--model.init_args.reward_weights=[1]"]
    assert fit(tmp_path, "--trainer.eval_before_training", "false", *reward) == EXIT_STOPPED
    assert not (tmp_path / "adapter").exists()


def test_some_non_finite_rewards_are_a_metric_in_metrics_csv(tmp_path):
    reward = ["--model.init_args.reward_funcs", f"[{__name__}.nan_reward]", "--model.init_args.reward_weights=[1]"]
    assert fit(tmp_path, "--trainer.num_rounds", "1", "--trainer.eval_before_training", "false", *reward) == 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "client0/rewards/nan_reward/errors" in header


def test_a_full_disk_while_checkpointing_is_one_clear_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    fabric = checkpoint.fabric(accelerator="cpu", devices=1)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . basic_ios::clear: iostream error")

    monkeypatch.setattr(fabric, "save", full)
    with pytest.raises(OSError, match="round-000001.*disk full"):
        checkpoint.save(tmp_path, 1, fabric, {"round": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_holds_the_trainable_state_not_the_model(finished, capsys):
    path = checkpoint.latest_valid(finished / "checkpoints")
    state = checkpoint.load(path)

    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    adapter = nbytes(state["server"]["global_state"])
    clients = nbytes(state["clients"])  # every client's optimizer rows, RNG and sampler state
    on_disk = (path / "state.pt").stat().st_size
    with capsys.disabled():
        print(f"\ncheckpoint {on_disk} B; global adapter {adapter} B + client states {clients} B")
    assert on_disk < 2 * (adapter + clients)


def test_argparse_prefixes_are_not_expanded(tmp_path, capsys):
    assert fit(tmp_path, "--trainer.num_round", "3") == EXIT_USAGE
    assert "--trainer.num_round" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_clients"):
        main(["fit", "-c", TINY, "--trainer.output_dir", str(tmp_path), "--data.num_clients", "0", "--debug"])


# -- a table of bad input: exit 2, the named location, no traceback ---------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    if path.parent.is_dir():
        path.write_bytes(data)
    return str(path)


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(id, extra arguments, text the one-line error must contain)."""
    no_field = _write(tmp / "nofield.jsonl", b'{"prompt": "a", "answer": "1"}\n{"question": "b"}\n')
    bad_json = _write(tmp / "badjson.jsonl", b'{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    latin = _write(tmp / "latin.jsonl", '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    empty = _write(tmp / "empty.jsonl", b"")

    def files(path: str) -> list[str]:
        return ["--data.data_files", f"[{path}]", "--data.partition", "iid"]

    return [
        ("num_clients-0", ["--data.num_clients", "0"], "num_clients"),
        ("num_generations-1", ["--model.init_args.num_generations", "1"], "num_generations"),
        ("learning_rate-negative", ["--model.init_args.learning_rate", "-1"], "learning_rate"),
        ("eval_batch_size-0", ["--trainer.eval_batch_size", "0"], "eval_batch_size"),
        ("num_rounds-0", ["--trainer.num_rounds", "0"], "num_rounds"),
        ("local_steps-0", ["--trainer.local_steps", "0"], "local_steps"),
        ("min_clients-0", ["--trainer.min_clients", "0"], "min_clients"),
        ("keep_checkpoints-0", ["--trainer.keep_checkpoints", "0"], "keep_checkpoints"),
        ("task-typo", ["--data.tasks", "[basic_arithmetc]"], "basic_arithmetc"),
        ("partition-typo", ["--data.partition", "by_tsak"], "by_tsak"),
        ("model-path-missing", ["--model.init_args.model", str(tmp / "nope")], "nope"),
        ("model-dir-not-a-model", ["--model.init_args.model", str(tmp)], "config.json"),
        ("data-file-missing", files(str(tmp / "missing.jsonl")), "missing.jsonl"),
        ("data-file-row-without-prompt", files(no_field), "nofield.jsonl: row 2, column 'prompt'"),
        ("data-file-bad-json", files(bad_json), "badjson.jsonl: line 2"),
        ("data-file-not-utf8", files(latin), "latin.jsonl: line 1: not UTF-8"),
        ("data-file-empty", files(empty), "empty.jsonl: no rows"),
        ("reward-func-unknown", ["--model.init_args.reward_funcs", "[no.such.reward]"], "no.such.reward"),
        ("reward-weights-length", ["--model.init_args.reward_weights", "[1, 2, 3]"], "reward_weights"),
        ("micro-batch-0", ["--model.init_args.micro_batch_size", "0"], "micro_batch_size"),
        ("prompts-per-step-0", ["--model.init_args.prompts_per_step", "0"], "prompts_per_step"),
        ("lora-r-0", ["--model.init_args.lora_r", "0"], "lora_r"),
        ("temperature-negative", ["--model.init_args.temperature", "-1"], "temperature"),
        ("train-size-0", ["--data.train_size", "0"], "train_size"),
        ("ckpt-path-missing", ["--ckpt_path", str(tmp / "no-checkpoint")], "no-checkpoint"),
        ("unknown-key", ["--trainer.num_roundz", "3"], "num_roundz"),
    ]


CASE_IDS = [case[0] for case in bad_inputs(Path("/nonexistent"))]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_is_one_line_exit_2_naming_the_place(tmp_path, capsys, case_id):
    _, extra, named = next(c for c in bad_inputs(tmp_path) if c[0] == case_id)
    out = tmp_path / "run"
    code = fit(out, *extra)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err[-2000:]
    assert named in err and "Traceback" not in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("fedrl: error")]) <= 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
