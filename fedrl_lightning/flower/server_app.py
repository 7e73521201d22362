"""The Flower ServerApp: our ``Server`` built from the run's YAML config, run by ``FedRLStrategy``, resumable.

It parses the same config as the ClientApps (``settings``), so the aggregator, selector, callbacks and fault rules
are the ones ``fedrl fit`` would build; the module is only needed for the initial adapter and to export the final
one. Outputs go where ``fedrl fit`` puts them, under ``trainer.output_dir``: ``checkpoints/round-NNNNNN/``,
``metrics.csv`` and TensorBoard logs, ``curves.png`` and the PEFT ``adapter/`` (none for a personalized aggregator:
its clients keep their own). A restarted ServerApp (same config, ``ckpt-path = "last"``) continues after the newest
valid checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedrl_lightning import checkpoint, reporting
from fedrl_lightning.flower import records
from fedrl_lightning.flower.settings import FlowerSettings, build
from fedrl_lightning.flower.strategy import FedRLStrategy
from fedrl_lightning.plots import plot_run
from fedrl_lightning.selection import UniformSelector
from fedrl_lightning.server import Server

log = logging.getLogger(__name__)


def make_server(args: Mapping[str, Any], output_dir: Path) -> Server:
    """The server for ``FederatedTrainer``'s arguments ``args`` (aggregation, selector, faults, evaluation)."""
    if args["aggregation"] is None:
        raise ValueError("trainer.aggregation is null (local-only training): a Flower run needs an aggregator")
    return Server(
        checkpoint.fabric(accelerator="cpu", devices=1),
        args["aggregation"],
        args["selector"] or UniformSelector(seed=args["seed"]),
        args["num_rounds"],
        callbacks=args["callbacks"] or [],
        loggers=reporting.run_loggers(output_dir),
        checkpoint_dir=output_dir / "checkpoints",
        keep_checkpoints=args["keep_checkpoints"],
        min_clients=args["min_clients"],
        round_retries=args["round_retries"],
        eval_every=args["eval_every"],
        eval_before_training=args["eval_before_training"],
    )


def run_server(grid: Grid, settings: FlowerSettings) -> tuple[Result, FedRLStrategy]:
    """Build the server from ``settings``, run or resume the rounds on ``grid``, and write the outputs."""
    args, module, data = build(settings, "--trainer.progress", "false")
    output_dir = Path(args["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    initial = module.trainable_state()
    strategy = FedRLStrategy(
        make_server(args, output_dir),
        ckpt_path=settings.ckpt_path,
        min_available_nodes=settings.min_nodes or len(data.client_ids()),
        node_wait_timeout=settings.node_wait_timeout,
        dtypes={k: v.dtype for k, v in initial.items()},
    )
    result = strategy.start(grid, records.to_record(initial), timeout=settings.round_timeout)
    server = strategy.server
    if server.shared_state() is not None:
        module.save_adapter(output_dir / "adapter", server.global_state)
        if args["save_merged"]:
            module.save_merged(output_dir / "merged", server.global_state)
    else:  # a personalized aggregator: no global adapter
        log.info("each client's own adapter is in its saved state (the ClientApp's client-state-dir)")
    plot_run(server.history, output_dir / "curves.png")
    log.info("fedrl-lightning on Flower: %d rounds done, outputs in %s", server.round_idx, output_dir)
    return result, strategy


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (for ``run_simulation``, which passes none)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, FlowerSettings.from_run_config(context.run_config, defaults))

    return app


app = build_server_app()
"""The ServerApp of ``flwr run`` (``serverapp = "fedrl_lightning.flower.server_app:app"``)."""
