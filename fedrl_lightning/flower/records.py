"""What crosses the wire in a Flower run: our tensors and ``ClientUpdate`` as Flower records, and back.

Tensors travel as ``ArrayRecord`` (NumPy ``.npy`` bytes). NumPy has no bfloat16, so half-precision tensors are cast
to float32 on the wire and back to the receiver's dtype on arrival (lossless both ways); float32/float64 pass as
they are. A client's reply is one ``RecordDict``:

- ``arrays`` (ArrayRecord): the adapter after local training;
- ``metrics`` (MetricRecord): ``client-id``, ``num-examples`` (prompts), ``num-tokens`` and the round's training
  metrics under our names (``reward``, ``kl``, ...);
- ``extra`` (ConfigRecord): scalar side information (``task``, ``accuracy``);
- ``extra.<name>`` (ArrayRecord): tensor side information, e.g. ``extra.scaffold_delta_c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedrl_lightning.aggregation import ClientUpdate

EXTRA_PREFIX = "extra."
_RESERVED = ("client-id", "num-examples", "num-tokens")
_HALF = (torch.bfloat16, torch.float16)


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord, half precision cast to float32 (NumPy cannot hold bfloat16)."""
    return ArrayRecord(
        {k: v.detach().cpu().float() if v.dtype in _HALF else v.detach().cpu() for k, v in state.items()}
    )


def from_record(record: ArrayRecord, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Named tensors from an ArrayRecord, in ``like``'s dtypes when given (names must then match exactly).

    Raises:
        KeyError: names differ from ``like``'s.
    """
    # Own memory: tensors from NumPy buffers of a message are read-only views.
    state = {k: v.clone() for k, v in record.to_torch_state_dict().items()}
    if like is None:
        return state
    if state.keys() != like.keys():
        missing, unexpected = sorted(like.keys() - state.keys()), sorted(state.keys() - like.keys())
        raise KeyError(f"received tensors differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return {k: state[k].to(like[k].dtype) for k in like}


def update_to_content(update: ClientUpdate) -> RecordDict:
    """A client's update as the reply's content (see the module docstring)."""
    metrics: dict[str, int | float] = {
        "client-id": update.client_id,
        "num-examples": int(update.num_samples),
        "num-tokens": int(update.num_tokens),
    }
    metrics.update({k: float(v) for k, v in update.metrics.items() if k not in _RESERVED})
    content = RecordDict({"arrays": to_record(update.state), "metrics": MetricRecord(metrics)})
    scalars: dict[str, Any] = {}
    for key, value in update.extra.items():
        if isinstance(value, Mapping):
            content[EXTRA_PREFIX + key] = to_record(value)
        elif isinstance(value, str | bool | int | float):
            scalars[key] = value
        else:
            raise TypeError(f"ClientUpdate.extra[{key!r}]: {type(value).__name__} cannot cross the wire")
    content["extra"] = ConfigRecord(scalars)
    return content


def content_to_update(content: RecordDict, like: Mapping[str, Tensor]) -> ClientUpdate:
    """A reply's content back as a ``ClientUpdate``, the adapter in ``like``'s dtypes (the global adapter's).

    Raises:
        ValueError: a record is missing or the adapter is not finite (the client is then dropped from the round).
    """
    missing = [k for k in ("arrays", "metrics") if k not in content]
    if missing:
        raise ValueError(f"reply without {missing}")
    metrics = dict(content["metrics"])
    client_id = int(metrics.pop("client-id"))
    state = from_record(content["arrays"], like)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"client {client_id} sent a non-finite tensor {name!r}")
    extra: dict[str, Any] = dict(content.config_records.get("extra", {}))
    for name, record in content.array_records.items():
        if name.startswith(EXTRA_PREFIX):
            extra[name[len(EXTRA_PREFIX) :]] = from_record(record)
    return ClientUpdate(
        client_id=client_id,
        state=state,
        num_samples=int(metrics.pop("num-examples")),
        num_tokens=int(metrics.pop("num-tokens", 0)),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        extra=extra,
    )


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (tensor data plus keys), as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())
