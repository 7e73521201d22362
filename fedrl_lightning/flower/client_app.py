"""The Flower ClientApp: one ``Client.run_round`` per ``train`` message, held-out evaluation per ``evaluate``.

The ClientApp builds our ``Client`` from the run's YAML config (``settings``) and runs its round for this
SuperNode's client: the same local GRPO steps, client hooks, fault checks (``client_timeout``, ``max_update_norm``)
and aggregator-side objective as in one process. Which client a SuperNode is comes from its node config:
``partition-id`` (set by the simulation engine, or with ``flower-supernode --node-config 'partition-id=0'``).

Per message: the global adapter arrives in ``arrays`` and the aggregator's client-side tensors (e.g. SCAFFOLD's c)
in ``objective``; the client's private state is loaded from its disk (``ClientStateStore``) into the client's
bank, the round runs, the new state is saved, and the adapter, metrics and side information go back (``records``).
A message without ``arrays`` is a personalized aggregator's round (Federated PPO's ``PeerMixture``): the client
starts from its own adapter, and evaluates its own. A ``query`` message asks which client this SuperNode is. A
raised error becomes Flower's error reply, which the server counts as a dropped client.

The built client is cached per process: the simulation engine keeps its workers across rounds, so the model loads
once per worker; a deployment SuperNode starts a process per message and loads it every time (from the local
safetensors cache for the embedded model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from fedrl_lightning import checkpoint
from fedrl_lightning.client import Client, Downlink
from fedrl_lightning.flower import records
from fedrl_lightning.flower.settings import FlowerSettings, build
from fedrl_lightning.flower.state import ClientStateStore
from fedrl_lightning.rollout.hf import HFRollout


@dataclass
class _Site:
    """This process's client and where its states live."""

    client: Client
    state_root: Path
    keep: int
    eval_batch_size: int


_CACHE: dict[tuple[Any, ...], _Site] = {}


def _site(settings: FlowerSettings, node_config: Mapping[str, Any]) -> _Site:
    """The process's client for these settings, built and set up on first use."""
    key = (*settings.cli_args(), settings.client_state_dir)
    if key not in _CACHE:
        args, module, data = build(settings, "--trainer.progress", "false")
        fabric = checkpoint.fabric(accelerator=args["accelerator"], devices=1, precision=args["precision"])
        fabric.launch()
        fabric.seed_everything(args["seed"])
        client = Client.setup(
            fabric,
            module,
            data,
            args["rollout"] or HFRollout(),
            args["aggregation"],
            local_steps=args["local_steps"],
            num_rounds=args["num_rounds"],
            seed=args["seed"],
            client_timeout=args["client_timeout"],
            max_update_norm=args["max_update_norm"],
            callbacks=args["callbacks"] or [],
        )
        root = Path(settings.client_state_dir or Path(args["output_dir"]) / "clients")
        _CACHE[key] = _Site(client, root, max(2, args["keep_checkpoints"]), args["eval_batch_size"])
    site = _CACHE[key]
    if "state-dir" in node_config:
        return _Site(site.client, Path(str(node_config["state-dir"])), site.keep, site.eval_batch_size)
    return site


def partition_id(context: Context) -> int:
    """This SuperNode's ``partition-id``.

    Raises:
        ValueError: it has none.
    """
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id': start it with --node-config 'partition-id=<k>'")
    return int(context.node_config["partition-id"])


def client_id(context: Context, num_clients: int) -> int:
    """This SuperNode's client: its ``partition-id``.

    Raises:
        ValueError: no ``partition-id``, or one outside the config's clients.
    """
    cid = partition_id(context)
    if not 0 <= cid < num_clients:
        raise ValueError(f"partition-id {cid} is not one of the config's {num_clients} clients")
    return cid


def train(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """One client round from the message's global adapter and round number; the reply carries the update."""
    site = _site(settings, context.node_config)
    client = site.client
    cid = client_id(context, len(client.data.client_ids()))
    r = int(msg.content["config"]["server-round"])
    global_state = None
    if "arrays" in msg.content:
        global_state = records.from_record(msg.content["arrays"], client.initial_adapter)
    objective = records.from_record(msg.content["objective"]) if "objective" in msg.content else {}
    store = ClientStateStore(site.state_root, cid, keep=site.keep, fabric=client.fabric)
    saved = store.load(before_round=r)
    if saved is not None:
        client.bank.put(cid, saved)
    else:
        client.bank.forget([cid])
    update = client.run_round(cid, Downlink(r, global_state, objective, personal=global_state is None))
    store.save(r, client.bank.get(cid, clone=True))
    return Message(content=records.update_to_content(update), reply_to=msg)


def own_adapter(site: _Site, cid: int, r: int) -> dict[str, Tensor]:
    """The client's own adapter after round ``r``: its newest saved state's, else the initial one."""
    saved = ClientStateStore(site.state_root, cid, keep=site.keep, fabric=site.client.fabric).load(before_round=r + 1)
    return saved.adapter if saved is not None and saved.adapter is not None else site.client.initial_adapter


def evaluate_global(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """Greedy accuracy and reward of the global adapter (without one: the client's own) on its held-out split."""
    site = _site(settings, context.node_config)
    client = site.client
    cid = client_id(context, len(client.data.client_ids()))
    if "arrays" in msg.content:
        adapter = records.from_record(msg.content["arrays"], client.initial_adapter)
    else:
        adapter = own_adapter(site, cid, int(msg.content["config"]["server-round"]))
    result = client.evaluate(cid, adapter, site.eval_batch_size)
    num_examples = len(client.data.eval_examples(cid))
    metrics = {"client-id": cid, "num-examples": num_examples, **{f"eval/{k}": v for k, v in result.items()}}
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

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        """Which client this SuperNode is (without loading the model)."""
        content = RecordDict({"metrics": MetricRecord({"client-id": partition_id(context)})})
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app()
"""The ClientApp of ``flwr run`` (``clientapp = "fedrl_lightning.flower.client_app:app"``)."""
