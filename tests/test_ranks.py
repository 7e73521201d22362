"""Fabric ranks: a round's clients sharded over 2 CPU processes (gloo) give the 1-process run's global adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrl_lightning import checkpoint
from fedrl_lightning.ranks import in_client_order, shard


def test_shard_and_order_cover_every_client_once():
    clients = [5, 2, 7, 0, 3]
    parts = [shard(clients, r, 2) for r in range(2)]
    assert parts == [[5, 7, 3], [2, 0]]
    results = [{c: f"u{c}" for c in part} for part in parts]
    assert in_client_order(clients, results) == [(c, f"u{c}") for c in clients]
    with pytest.raises(RuntimeError, match=r"clients \[0\]"):
        in_client_order(clients, [results[0], {2: "u2"}])


def _fit(out: Path, devices: int, *extra: str) -> tuple[dict, str]:
    # One thread per process in both runs, so each client's matmuls reduce in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000 + devices)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    args = ["fit", "-c", "configs/tiny.yaml", "--trainer.output_dir", str(out), "--trainer.devices", str(devices)]
    args += ["--data.num_clients", "4", "--data.eval_size", "1", "--trainer.eval_every", "2"]
    # A reward that varies for a random model (conftest.length_reward), so the clients really learn something.
    args += ["--model.init_args.reward_funcs", "[conftest.length_reward]", "--model.init_args.reward_weights", "[1.0]"]
    cmd = [sys.executable, "-m", "fedrl_lightning.cli", *args, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint.load(checkpoint.latest_valid(out / "checkpoints")), proc.stderr


def test_two_gloo_processes_give_the_one_process_global_adapter(tmp_path):
    (one_ckpt, _), (two_ckpt, log) = _fit(tmp_path / "one", 1), _fit(tmp_path / "two", 2)
    assert "MEMBER: 2/2" in log  # rank 1 joined
    one, two = one_ckpt["server"], two_ckpt["server"]
    assert one["round"] == two["round"] == 2
    # PEFT starts lora_B at zero: non-zero B means the clients really trained, so the comparison is not vacuous.
    assert any(v.abs().sum() > 0 for k, v in one["global_state"].items() if "lora_B" in k)
    # Each client's round runs the same ops on the same state whichever rank runs it; the aggregation is the same
    # float64 sum in the same client order. Tolerance: exact up to 1e-6 (float32 rounding noise only).
    for name, value in one["global_state"].items():
        torch.testing.assert_close(two["global_state"][name], value, rtol=0, atol=1e-6)
    # Rank 0 wrote every client's state, and the ledger has the traffic of the clients rank 1 ran.
    clients = one_ckpt["clients"], two_ckpt["clients"]
    assert clients[0]["meta"].keys() == clients[1]["meta"].keys() == {0, 1, 2, 3}
    for cid in range(4):
        assert clients[0]["meta"][cid]["sampler"] == clients[1]["meta"][cid]["sampler"]
    for dtype, rows in clients[0]["buffers"]["optimizer"].items():  # every client's optimizer moments, to 1e-6
        torch.testing.assert_close(clients[1]["buffers"]["optimizer"][dtype], rows, rtol=0, atol=1e-6)
    assert one["comm"]["ledger"] == two["comm"]["ledger"]
    evals = [[h.get(f"client{c}/eval/accuracy") for c in range(4)] for h in (one["history"][-1], two["history"][-1])]
    assert evals[0] == evals[1] and None not in evals[0]


def test_two_ranks_resume_their_disk_banks_from_rank_zeros_checkpoint(tmp_path):
    """Each rank keeps a replica of the bank in its own directory under one id: the checkpoint rank 0 writes names
    it, so both ranks go back to its version on resume."""
    bank = ["--trainer.client_state_dir", str(tmp_path / "bank")]
    first, _ = _fit(tmp_path / "run", 2, *bank)
    assert first["clients"]["disk"]["version"] == 2 and "buffers" not in first["clients"]
    ids = {json.loads((tmp_path / "bank" / f"rank{r}" / "bank.json").read_text())["uid"] for r in (0, 1)}
    assert ids == {first["clients"]["disk"]["uid"]}
    later, _ = _fit(tmp_path / "run", 2, *bank, "--trainer.num_rounds", "3")
    assert later["server"]["round"] == 3 and later["clients"]["disk"]["version"] == 3
    done = first["server"]["history"]  # resumed, not rerun: rounds 1-2 are the first run's rows, timings included
    assert later["server"]["history"][: len(done)] == done
