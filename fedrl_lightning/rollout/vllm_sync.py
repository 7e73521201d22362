"""Keep a vLLM engine's copy of the policy equal to the live policy, pushing only when (and what) it changed.

The vLLM backends (``VLLMRollout``, ``VLLMServerRollout``) own one ``WeightSync`` and call it right before every
generation or scoring call. It compares the live adapter with what the engine holds, so no trainer hook has to
report changes: optimizer steps, a new global adapter, a client swap or evaluation's adapter swaps are all seen
the same way, several changes between two generations cost one push, and an unchanged adapter is never re-pushed.
When nothing changed the check is one equality pass over the adapter tensors (no copies, no engine calls).

Two methods:

* ``adapter``: the adapter is saved to a directory and registered as a fresh ``LoRARequest`` per version; the
  engine keeps its base weights and serves every client's adapter (up to ``max_adapters`` versions stay registered,
  least recently used dropped first), so switching back to an adapter the engine already has costs nothing. Needs
  a LoRA-enabled engine.
* ``merge``: per adapted module ``W + scale * B @ A`` is computed from the live weights (the training model is not
  mutated: no ``merge_adapter``); only modules whose adapter changed since the last push are sent (with the other
  shards of the fused vLLM layer they belong to, e.g. ``q/k/v -> qkv_proj``), in batches of ``batch_mb``, then the
  prefix cache is reset. Generation then needs no LoRA kernels.

Metrics, per call: ``sync/count`` (1 for a push, else 0: a switch to a registered adapter is not a push),
``sync/seconds`` (check + push) and ``sync/bytes`` go to the module's ``tracker``, so they land in the client's
per-step metrics as means per generation; ``totals`` sums them since construction.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SyncMethod = Literal["adapter", "merge"]
Batches = Iterable[list[tuple[str, Tensor]]]
_PEFT_PREFIX = "base_model.model."


class EngineOps(Protocol):
    """The engine operations a ``WeightSync`` uses; every vLLM backend implements them."""

    lora_request: Any

    def packed_modules_mapping(self) -> dict[str, list[str]] | None: ...

    def push_weights(self, batches: Batches) -> None: ...

    def reset_prefix_cache(self) -> None: ...

    def load_adapter(self, name: str, int_id: int, path: str) -> Any: ...

    def use_adapter(self, handle: Any) -> None: ...

    def remove_adapter(self, handle: Any) -> None: ...


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


class WeightSync:
    """What a vLLM engine holds of the policy, and the push that brings it up to date.

    Args:
        method: ``adapter`` (LoRA requests, one engine serves every client) or ``merge`` (merged base weights).
        batch_mb: merge method: megabytes of tensors per engine call (bounds the extra memory of a push).
        max_adapters: adapter method: adapter versions kept registered in the engine.
        adapter_dir: where adapter versions are written (a server must see it); None = a temporary directory
            removed when this object is.
    """

    def __init__(
        self,
        method: SyncMethod = "adapter",
        batch_mb: float = 256.0,
        max_adapters: int = 4,
        adapter_dir: str | Path | None = None,
    ) -> None:
        if batch_mb <= 0:
            raise ValueError(f"sync batch_mb must be > 0, got {batch_mb}")
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.method = method
        self.batch_bytes, self.max_adapters = int(batch_mb * 2**20), max_adapters
        self._adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._owns_dir = adapter_dir is None
        self.merged: dict[str, tuple[Tensor, Tensor]] = {}
        """Per adapted module (PEFT name): the (A, B) merged into the engine's weights by the merge method."""
        self._versions: list[_AdapterVersion] = []
        self._next_id = 1
        self.totals = {"sync/count": 0.0, "sync/seconds": 0.0, "sync/bytes": 0.0}
        self.last: dict[str, float] = {}

    @property
    def method(self) -> SyncMethod:
        return self._method

    @method.setter
    def method(self, value: SyncMethod) -> None:
        # Settable: switching methods on a live engine is handled (the merge method's weights are restored first).
        if value not in ("adapter", "merge"):
            raise ValueError(f"sync method must be 'adapter' or 'merge', got {value!r}")
        self._method = value

    def metrics(self) -> dict[str, float]:
        """Totals since construction: pushes, seconds spent checking and pushing, bytes pushed."""
        return dict(self.totals)

    # -- the sync ---------------------------------------------------------------------------------------------

    def __call__(self, engine: EngineOps, module: Any) -> bool:
        """Push the policy into ``engine`` if it differs from what the engine holds; True when tensors moved.

        Records ``sync/*`` in the module's ``tracker`` (when it has one) on every call, pushes or not.
        """
        start = time.perf_counter()
        policy = _unwrap(module)
        with torch.no_grad():
            if self.method == "merge":
                moved = self._sync_merge(engine, policy)
            else:
                moved = self._sync_adapter(engine, policy)
        seconds = time.perf_counter() - start
        self.last = {"sync/count": float(moved is not None), "sync/seconds": seconds, "sync/bytes": float(moved or 0)}
        for name, value in self.last.items():
            self.totals[name] += value
        tracker = getattr(policy, "tracker", None)
        if tracker is not None:
            for name, value in self.last.items():
                tracker.update(name, value)
        if moved is not None:
            log.debug("vLLM %s sync: %.1f MB in %.3f s", self.method, moved / 2**20, seconds)
        return moved is not None

    # merge: changed modules -> fused-layer units -> batches of merged tensors

    def _sync_merge(self, engine: EngineOps, policy: Any) -> int | None:
        adapter, layers = _lora_layers(policy.model)
        for name, layer in layers.items():
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(f"merge sync does not support DoRA ({name}); use sync method 'adapter'")
        changed = [n for n, layer in layers.items() if self._delta_differs(n, layer, adapter)]
        if engine.lora_request is not None:
            engine.use_adapter(None)  # generate from the (merged) base weights
        if not changed:
            return None
        moved = self._push_modules(engine, policy, changed, merge=True)
        engine.reset_prefix_cache()
        return moved

    def _delta_differs(self, name: str, layer: Any, adapter: str) -> bool:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        held = self.merged.get(name)
        if held is None:  # the engine holds the base weight: only a non-zero delta differs
            return bool(b.any() and a.any())
        return not (torch.equal(held[0], a) and torch.equal(held[1], b))

    def _push_modules(self, engine: EngineOps, policy: Any, names: list[str], merge: bool) -> int:
        """Push the fused-layer units containing ``names``: merged weights if ``merge``, else the base weights."""
        peft_model = policy.model
        modules = dict(peft_model.named_modules())
        adapter, layers = _lora_layers(peft_model)
        units = _fused_units(names, modules, engine.packed_modules_mapping())
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

        engine.push_weights(batches())
        for unit in units:
            for mod_name in unit:
                if mod_name not in layers:
                    continue
                if merge:
                    layer = layers[mod_name]
                    self.merged[mod_name] = (
                        layer.lora_A[adapter].weight.detach().clone(),
                        layer.lora_B[adapter].weight.detach().clone(),
                    )
                else:
                    self.merged.pop(mod_name, None)
        return pushed["bytes"]

    # adapter: one LoRARequest per adapter version

    def _sync_adapter(self, engine: EngineOps, policy: Any) -> int | None:
        rank = getattr(getattr(policy.model, "peft_config", {}).get("default", None), "r", None)
        max_rank = getattr(engine, "max_lora_rank", None)
        if rank is not None and max_rank is not None and rank > max_rank:
            raise ValueError(f"the policy's lora_r={rank} exceeds the engine's max_lora_rank={max_rank}")
        live = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
        moved = 0
        if self.merged:  # the merge method left merged weights: give the adapter its base back
            moved += self._push_modules(engine, policy, list(self.merged), merge=False)
            engine.reset_prefix_cache()
        # Newest first: between two generations the adapter usually is the one just used or a new one.
        for i in reversed(range(len(self._versions))):
            version = self._versions[i]
            if version.state.keys() == live.keys() and all(torch.equal(version.state[k], v) for k, v in live.items()):
                self._versions.append(self._versions.pop(i))  # most recently used last
                engine.use_adapter(version.handle)  # a registered version: a switch, not a push
                return moved or None
        version_id = self._next_id
        self._next_id += 1
        path = self._root() / f"v{version_id}"
        policy.save_adapter(path)
        handle = engine.load_adapter(f"fedrl-v{version_id}", version_id, str(path))
        engine.use_adapter(handle)
        self._versions.append(_AdapterVersion({k: v.detach().clone() for k, v in live.items()}, handle, path))
        while len(self._versions) > self.max_adapters:
            old = self._versions.pop(0)
            engine.remove_adapter(old.handle)
            shutil.rmtree(old.path, ignore_errors=True)
        return moved + sum(f.stat().st_size for f in path.glob("*.safetensors"))

    def _root(self) -> Path:
        if self._adapter_dir is None:
            self._adapter_dir = Path(tempfile.mkdtemp(prefix="fedrl-vllm-adapters-"))
            weakref.finalize(self, shutil.rmtree, str(self._adapter_dir), True)
        self._adapter_dir.mkdir(parents=True, exist_ok=True)
        return self._adapter_dir

    def reset(self, engine: EngineOps | None = None) -> None:
        """Forget what the engine holds: unregister every adapter version from ``engine`` (None = the engine is
        gone) and delete their files. Call it when the engine is reloaded or shut down."""
        for version in self._versions:
            try:
                if engine is not None:
                    engine.remove_adapter(version.handle)
            except Exception as err:  # the engine may be gone already
                log.debug("removing adapter %s: %s", version.path, err)
            shutil.rmtree(version.path, ignore_errors=True)
        self._versions, self.merged = [], {}
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


__all__ = ["Batches", "EngineOps", "SyncMethod", "WeightSync"]
