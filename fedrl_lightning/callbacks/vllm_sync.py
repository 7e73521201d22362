"""Keep a vLLM engine's copy of the policy equal to the trainer's, pushing only when (and what) it changed.

When: lazily. The trainer hooks mark the engine stale (``on_local_step_end`` after optimizer steps,
``on_after_aggregate`` after a new global adapter, ``on_client_start`` before the next client's adapter is swapped
in); the push happens right before the next generation, through the backend's ``before_generate`` hook, so several
changes between two generations cost one push and nothing is pushed that is never sampled from. The check before
a push also compares the live adapter with what the engine holds, so an adapter swap no hook reports (the
trainer's evaluation loads each client's adapter in turn) is caught, and an unchanged adapter is never re-pushed.

How, two methods:

* ``adapter`` (default): the adapter is saved to a temporary directory and registered as a fresh ``LoRARequest``
  per version; the engine keeps its base weights and serves every client's adapter (up to ``max_adapters``
  versions stay registered, least recently used dropped first), so switching back to an adapter the engine already
  has costs nothing. Needs ``VLLMRollout(enable_lora=True)``.
* ``merge``: per adapted module ``W + scale * B @ A`` is computed from the live weights (the training model is not
  mutated: no ``merge_adapter``), only modules whose adapter changed since the last push are sent (with the other
  shards of the fused vLLM layer they belong to, e.g. ``q/k/v -> qkv_proj``), in batches of ``batch_mb``, then
  the prefix cache is reset. Generation then needs no LoRA kernels.

Metrics: ``sync/count``, ``sync/seconds``, ``sync/bytes`` since the previous evaluation are added to the evaluation
metrics (so they land in the round's logged row); ``metrics()`` gives the totals.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.callbacks import Callback

log = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


@dataclass
class _AdapterVersion:
    state: dict[str, Tensor]
    handle: Any
    path: Path


def _unwrap(module: Any) -> Any:
    """The LightningModule behind a Fabric wrapper."""
    return getattr(module, "_original_module", module)


def _lora_layers(peft_model: Any) -> tuple[str, dict[str, Any]]:
    """(active adapter name, {PEFT module name: LoRA layer}) of the policy."""
    from peft.tuners.lora import LoraLayer

    adapter = getattr(peft_model, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else adapter[0]
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
    return adapter, layers


class VLLMWeightSync(Callback):
    """Pushes the policy into a vLLM backend before a generation whenever it changed since the last push.

    Args:
        method: ``adapter`` (LoRA requests, one engine serves every client) or ``merge`` (merged base weights).
        batch_mb: merge method: megabytes of tensors per engine call (bounds the extra memory of a push).
        max_adapters: adapter method: adapter versions kept registered; None = the backend's ``max_loras`` (4).
        check_changes: before each generation, also compare the live adapter with the engine's (catches swaps no
            hook reports; costs one pass over the adapter tensors). False = trust the hooks only.
        adapter_dir: where adapter versions are written (the server must see it in server mode); None = a
            temporary directory removed at exit.
    """

    def __init__(
        self,
        method: Literal["adapter", "merge"] = "adapter",
        batch_mb: float = 256.0,
        max_adapters: int | None = None,
        check_changes: bool = True,
        adapter_dir: str | None = None,
    ) -> None:
        if method not in ("adapter", "merge"):
            raise ValueError(f"method must be 'adapter' or 'merge', got {method!r}")
        if batch_mb <= 0:
            raise ValueError(f"batch_mb must be > 0, got {batch_mb}")
        self.method, self.batch_bytes, self.max_adapters = method, int(batch_mb * 2**20), max_adapters
        self.check_changes = check_changes
        self._adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._owns_dir = adapter_dir is None
        self.backend: Any = None
        self.dirty = True
        self._versions: list[_AdapterVersion] = []
        self._next_id = 1
        self.totals = {"sync/count": 0.0, "sync/seconds": 0.0, "sync/bytes": 0.0}
        self._interval = dict(self.totals)
        self.last: dict[str, float] = {}

    # -- wiring -----------------------------------------------------------------------------------------------

    def attach(self, backend: Any) -> VLLMWeightSync:
        """Sync into ``backend`` (a ``VLLMRollout`` or ``VLLMServerRollout``) before each of its generations."""
        if not hasattr(backend, "add_before_generate"):
            raise TypeError(f"VLLMWeightSync needs a vLLM rollout backend, got {type(backend).__name__}")
        if self.backend is not None and self.backend is not backend:
            raise RuntimeError("this VLLMWeightSync is already attached to another backend")
        self.backend = backend
        backend.add_before_generate(self.maybe_sync)
        self.dirty = True
        return self

    def mark_dirty(self) -> None:
        self.dirty = True

    # -- trainer hooks ----------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.attach(trainer.rollout)

    def on_client_start(self, trainer: Any, round_idx: int, client_id: int, module: Any) -> None:
        self.dirty = True  # the trainer swaps this client's adapter in right after this hook

    def on_local_step_end(self, trainer: Any, round_idx: int, client_id: int, module: Any, step: int) -> None:
        self.dirty = True

    def on_after_aggregate(self, trainer: Any, round_idx: int, global_state: dict[str, Any]) -> None:
        self.dirty = True

    def on_evaluate_end(self, trainer: Any, round_idx: int, metrics: dict[str, float]) -> None:
        metrics.update(self._interval)
        self._interval = dict.fromkeys(self._interval, 0.0)

    def metrics(self) -> dict[str, float]:
        """Totals since construction: number of pushes, their seconds and bytes."""
        return dict(self.totals)

    # -- the sync ---------------------------------------------------------------------------------------------

    def maybe_sync(self, backend: Any, module: Any) -> bool:
        """Push the policy into ``backend`` if it differs from what the engine holds; True when tensors moved.

        Selecting an adapter version the engine already has is a switch, not a push: it is not counted.
        """
        if not self.dirty and not self.check_changes:
            return False
        start = time.perf_counter()
        policy = _unwrap(module)
        with torch.no_grad():
            if self.method == "merge":
                moved = self._sync_merge(backend, policy)
            else:
                moved = self._sync_adapter(backend, policy)
        self.dirty = False
        if moved is None:
            return False
        seconds = time.perf_counter() - start
        self.last = {"sync/seconds": seconds, "sync/bytes": float(moved)}
        for bucket in (self.totals, self._interval):
            bucket["sync/count"] += 1
            bucket["sync/seconds"] += seconds
            bucket["sync/bytes"] += moved
        log.debug("vLLM %s sync: %.1f MB in %.3f s", self.method, moved / 2**20, seconds)
        return True

    # merge: changed modules -> fused-layer units -> batches of merged tensors

    def _sync_merge(self, backend: Any, policy: Any) -> int | None:
        adapter, layers = _lora_layers(policy.model)
        for name, layer in layers.items():
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(f"merge sync does not support DoRA ({name}); use method='adapter'")
        changed = [n for n, layer in layers.items() if self._delta_differs(backend, n, layer, adapter)]
        if getattr(backend, "lora_request", None) is not None:
            backend.use_adapter(None)  # generate from the (merged) base weights
        if not changed:
            return None
        moved = self._push_modules(backend, policy, changed, merge=True)
        backend.reset_prefix_cache()
        return moved

    @staticmethod
    def _delta_differs(backend: Any, name: str, layer: Any, adapter: str) -> bool:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        held = backend.merged_state.get(name)
        if held is None:  # the engine holds the base weight: only a non-zero delta differs
            return bool(b.any() and a.any())
        return not (torch.equal(held[0], a) and torch.equal(held[1], b))

    def _push_modules(self, backend: Any, policy: Any, names: list[str], merge: bool) -> int:
        """Push the fused-layer units containing ``names``: merged weights if ``merge``, else the base weights."""
        peft_model = policy.model
        modules = dict(peft_model.named_modules())
        adapter, layers = _lora_layers(peft_model)
        units = _fused_units(names, modules, backend.packed_modules_mapping())
        pushed = {"bytes": 0}

        def unit_tensors(unit: list[str]) -> list[tuple[str, Tensor]]:
            out = []
            for mod_name in unit:
                mod = modules[mod_name]
                base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
                hf = mod_name.removeprefix(_PEFT_PREFIX)
                weight = base.weight.detach()
                if merge and mod_name in layers:
                    weight = weight + layers[mod_name].get_delta_weight(adapter).to(weight.dtype)
                out.append((f"{hf}.weight", weight))
                if getattr(base, "bias", None) is not None:
                    out.append((f"{hf}.bias", base.bias.detach()))
            return out

        def batches() -> Iterator[list[tuple[str, Tensor]]]:
            # Lazily, unit by unit: at most one batch of merged tensors exists at a time. A batch boundary never
            # splits a fused layer (vLLM rebuilds a layer only from what one call holds).
            batch: list[tuple[str, Tensor]] = []
            size = 0
            for unit in units:
                items = unit_tensors(unit)
                unit_size = sum(t.numel() * t.element_size() for _, t in items)
                if batch and size + unit_size > self.batch_bytes:
                    yield batch
                    batch, size = [], 0
                batch.extend(items)
                size += unit_size
                pushed["bytes"] += unit_size
            if batch:
                yield batch

        backend.push_weights(batches())
        for unit in units:
            for mod_name in unit:
                if mod_name not in layers:
                    continue
                if merge:
                    layer = layers[mod_name]
                    backend.merged_state[mod_name] = (
                        layer.lora_A[adapter].weight.detach().clone(),
                        layer.lora_B[adapter].weight.detach().clone(),
                    )
                else:
                    backend.merged_state.pop(mod_name, None)
        return pushed["bytes"]

    # adapter: one LoRARequest per adapter version

    def _sync_adapter(self, backend: Any, policy: Any) -> int | None:
        if not getattr(backend, "enable_lora", False):
            raise RuntimeError("method='adapter' needs a LoRA-enabled engine: VLLMRollout(enable_lora=True)")
        rank = getattr(getattr(policy.model, "peft_config", {}).get("default", None), "r", None)
        max_rank = getattr(backend, "max_lora_rank", None)
        if rank is not None and max_rank is not None and rank > max_rank:
            raise ValueError(f"the policy's lora_r={rank} exceeds the engine's max_lora_rank={max_rank}")
        live = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
        moved = 0
        if backend.merged_state:  # a merge sync left merged weights: give the adapter its base back
            moved += self._push_modules(backend, policy, list(backend.merged_state), merge=False)
            backend.reset_prefix_cache()
        for i, version in enumerate(self._versions):
            if version.state.keys() == live.keys() and all(torch.equal(version.state[k], v) for k, v in live.items()):
                self._versions.append(self._versions.pop(i))  # most recently used last
                backend.use_adapter(version.handle)  # a registered version: a switch, not a push
                return moved or None
        version_id = self._next_id
        self._next_id += 1
        path = self._root() / f"v{version_id}"
        policy.save_adapter(path)
        handle = backend.load_adapter(f"fedrl-v{version_id}", version_id, str(path))
        backend.use_adapter(handle)
        self._versions.append(_AdapterVersion({k: v.detach().clone() for k, v in live.items()}, handle, path))
        limit = self.max_adapters or getattr(backend, "max_loras", None) or 4
        while len(self._versions) > limit:
            old = self._versions.pop(0)
            backend.remove_adapter(old.handle)
            shutil.rmtree(old.path, ignore_errors=True)
        return moved + sum(f.stat().st_size for f in path.glob("*.safetensors"))

    def _root(self) -> Path:
        if self._adapter_dir is None:
            self._adapter_dir = Path(tempfile.mkdtemp(prefix="fedrl-vllm-adapters-"))
            weakref.finalize(self, shutil.rmtree, str(self._adapter_dir), True)
        self._adapter_dir.mkdir(parents=True, exist_ok=True)
        return self._adapter_dir

    def close(self) -> None:
        """Unregister every adapter version and delete their files."""
        for version in self._versions:
            try:
                if self.backend is not None:
                    self.backend.remove_adapter(version.handle)
            except Exception as err:  # the engine may be gone already
                log.debug("removing adapter %s: %s", version.path, err)
            shutil.rmtree(version.path, ignore_errors=True)
        self._versions = []
        if self._owns_dir and self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
            self._adapter_dir = None


def _fused_units(names: list[str], modules: dict[str, Any], packed: dict[str, list[str]] | None) -> list[list[str]]:
    """Group module names into the sets vLLM loads as one layer, completed with their siblings, in model order.

    With vLLM's ``packed_modules_mapping`` (e.g. ``qkv_proj: [q_proj, k_proj, v_proj]``) a module joins the other
    shards of its fused layer; without it (server mode) every linear sibling in the same parent block is pushed.
    """
    units: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if packed is not None:
            group = next((members for members in packed.values() if leaf in members), [leaf])
            siblings = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in modules]
        else:
            siblings = [
                n
                for n, m in modules.items()
                if n.rpartition(".")[0] == parent and _is_linear(m) and not n.endswith(".base_layer")
            ]
        units.setdefault(tuple(sorted(siblings)), sorted(siblings))
    order = {n: i for i, n in enumerate(modules)}
    return sorted(units.values(), key=lambda unit: order[unit[0]])


def _is_linear(module: Any) -> bool:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return isinstance(base, torch.nn.Linear)


__all__ = ["VLLMWeightSync"]
