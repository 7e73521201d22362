"""vLLM rollouts from a real ``vllm serve`` process (``VLLMServerRollout``), with its own weight sync over HTTP.

Slow (the server starts in ~20 s); the tiny checkpoint and the tolerances are ``test_vllm.py``'s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_vllm import (
    HAS_VLLM,
    LOGPROB_ATOL,
    PROMPTS,
    SKIP_REASON,
    fixed_batch,
    max_diff,
    perturb_adapter,
    save_tiny_checkpoint,
    tiny_module,
    trainer_log_probs,
    vllm_test,
)

from fedrl_lightning.rollout.hf import HFRollout
from fedrl_lightning.rollout.vllm_server import VLLMServerRollout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vllm"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip(SKIP_REASON)
    port = _free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_SERVER_DEV_MODE="1")
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"]
    cmd += ["--kv-cache-memory-bytes", str(2**28), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4"]
    cmd += ["--logprobs-mode", "processed_logprobs"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    client = VLLMServerRollout(f"http://127.0.0.1:{port}", max_prompt_length=None)
    deadline = time.time() + 300
    while not client.health():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"vllm serve did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(2)
    yield client
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    client.close()


@pytest.mark.slow
@vllm_test
def test_server_generates_and_syncs_both_ways(server, tiny_dir):
    module = tiny_module(tiny_dir)
    batch = fixed_batch(module)
    out = server.generate(module, PROMPTS, module.sampling)
    ref = HFRollout().generate(module, PROMPTS, module.sampling)
    assert torch.equal(out.prompt_ids, ref.prompt_ids)
    lp = trainer_log_probs(module, (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask))
    assert max_diff(lp, out.sampling_log_probs, out.completion_mask) <= LOGPROB_ATOL

    perturb_adapter(module, seed=6)
    target = trainer_log_probs(module, batch)
    assert max_diff(target, server.completion_log_probs(module, *batch, sync=False), batch[3]) > 100 * LOGPROB_ATOL
    sync = server.weight_sync
    assert sync.method == "adapter"  # the default
    assert max_diff(target, server.completion_log_probs(module, *batch), batch[3]) <= LOGPROB_ATOL
    assert server.lora_request is not None and str(server.exchange_dir) in str(sync._root())
    sync.method = "merge"
    pushes = sync.totals["sync/count"]
    assert max_diff(target, server.completion_log_probs(module, *batch), batch[3]) <= LOGPROB_ATOL
    assert server.lora_request is None and sync.totals["sync/count"] == pushes + 1
    params = module.eval_sampling()
    assert torch.equal(
        server.generate(module, PROMPTS, params).completion_ids,
        HFRollout().generate(module, PROMPTS, params).completion_ids,
    )
    assert sync.totals["sync/count"] == pushes + 1  # unchanged: no second push
