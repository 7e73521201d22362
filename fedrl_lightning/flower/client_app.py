"""The Flower ClientApp: one of our clients' rounds per ``train`` message, held-out evaluation per ``evaluate``.

The ClientApp builds a ``FederatedTrainer`` from the run's YAML config (``settings``) and runs its
``client_round`` for this SuperNode's client: the same local GRPO steps, client hooks, fault checks (``client_timeout``,
``max_update_norm``, non-finite updates) and aggregator-side ``LocalObjective`` as the in-process trainer. Which
client a SuperNode is comes from its node config: ``partition-id`` (set by the simulation engine, or with
``flower-supernode --node-config 'partition-id=0'``).

Per message: the global adapter arrives in ``arrays`` (and an aggregator's client-side tensors, e.g. SCAFFOLD's c,
in ``objective``); the client's private state is loaded from its disk (``ClientStateStore``), the round runs, the
new state is saved, and the adapter, metrics and side information go back (``records``). A raised error becomes
Flower's error reply, which the server counts as a dropped client.

The built trainer is cached per process: the simulation engine keeps its workers across rounds, so the model loads
once per worker; a deployment SuperNode starts a process per message and loads it every time (from the local
safetensors cache for the embedded model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrl_lightning.aggregation import Aggregator, LocalObjective
from fedrl_lightning.client import ClientState, evaluate
from fedrl_lightning.flower import hooks, records
from fedrl_lightning.flower.settings import FlowerSettings, build
from fedrl_lightning.flower.state import ClientStateStore


@dataclass
class _Client:
    """A set-up trainer and what a round needs besides it."""

    trainer: Any
    initial_states: dict[int, ClientState]
    state_root: Path


_CACHE: dict[tuple[Any, ...], _Client] = {}


def _client(settings: FlowerSettings, node_config: Mapping[str, Any]) -> _Client:
    """The process's trainer for these settings, built and set up on first use."""
    key = (*settings.cli_args(), settings.client_state_dir)
    if key not in _CACHE:
        trainer, module, data = build(settings, "--trainer.progress", "false")
        trainer.setup(module, data, ckpt_path=None)  # the server owns the run's checkpoints
        trainer.fabric.call("on_fit_start", trainer=trainer, module=trainer.module)
        # Snapshots of the fresh states: the trainer replaces a state's fields after a round, never mutates them.
        initial = {cid: replace(s) for cid, s in trainer.client_states.items()}
        _CACHE[key] = _Client(trainer, initial, Path(settings.client_state_dir or trainer.output_dir / "clients"))
    client = _CACHE[key]
    if "state-dir" in node_config:
        return replace(client, state_root=Path(str(node_config["state-dir"])))
    return client


def client_id(context: Context, num_clients: int) -> int:
    """This SuperNode's client: its ``partition-id``.

    Raises:
        ValueError: no ``partition-id``, or one outside the config's clients.
    """
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id': start it with --node-config 'partition-id=<k>'")
    cid = int(context.node_config["partition-id"])
    if not 0 <= cid < num_clients:
        raise ValueError(f"partition-id {cid} is not one of the config's {num_clients} clients")
    return cid


class _ServerObjective(Aggregator):
    """The client's aggregator, with the client-side tensors the server sent instead of locally computed ones.

    ``client_round`` asks its aggregator for the round's ``LocalObjective``; on a client that aggregator has never
    aggregated (SCAFFOLD's c is zero there), so the objective's ``down`` is replaced by what the server sent.
    """

    def __init__(self, inner: Aggregator, down: dict[str, Any]) -> None:
        self.inner, self.down = inner, down

    def local_objective(self, global_state: dict[str, Any], client_extra: dict[str, Any]) -> LocalObjective | None:
        objective = self.inner.local_objective(global_state, client_extra)
        if objective is not None:
            objective.down = self.down
        return objective


def train(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """One client round from the message's global adapter and round number; the reply carries the update."""
    client = _client(settings, context.node_config)
    trainer = client.trainer
    cid = client_id(context, len(client.initial_states))
    r = int(msg.content["config"]["server-round"])
    like = trainer.module.trainable_state()
    trainer.global_state = records.from_record(msg.content["arrays"], like)
    store = ClientStateStore(client.state_root, cid, keep=max(2, trainer.keep_checkpoints))
    saved = store.load(before_round=r)
    trainer.client_states[cid] = saved if saved is not None else replace(client.initial_states[cid])
    aggregation = trainer.aggregation
    if "objective" in msg.content:
        trainer.aggregation = _ServerObjective(aggregation, records.from_record(msg.content["objective"]))
    try:
        update = trainer.client_round(r, cid)
    finally:
        trainer.aggregation = aggregation
    state = trainer.client_states[cid]
    hooks.client_side(trainer.fabric._callbacks, state.extra, update)
    store.save(r, state)
    return Message(content=records.update_to_content(update), reply_to=msg)


def evaluate_global(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """Greedy accuracy and reward of the global adapter on this client's held-out split."""
    client = _client(settings, context.node_config)
    trainer = client.trainer
    cid = client_id(context, len(client.initial_states))
    trainer.module.load_trainable_state(records.from_record(msg.content["arrays"], trainer.module.trainable_state()))
    examples = trainer.data.eval_examples(cid)
    result = evaluate(trainer.module, trainer.rollout, examples, trainer.eval_batch_size)
    metrics = {"client-id": cid, "num-examples": len(examples), **{f"eval/{k}": v for k, v in result.items()}}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def build_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to ``defaults`` (for ``run_simulation``, which passes none)."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, FlowerSettings.from_run_config(context.run_config, defaults))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_global(msg, context, FlowerSettings.from_run_config(context.run_config, defaults))

    return app


app = build_client_app()
"""The ClientApp of ``flwr run`` (``clientapp = "fedrl_lightning.flower.client_app:app"``)."""
