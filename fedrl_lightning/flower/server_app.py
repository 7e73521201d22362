"""The Flower ServerApp: our server (``FedRLStrategy``) built from the run's YAML config, resumable.

It parses the same config as the ClientApps (``settings``), so the module, aggregator and callbacks are the ones
``fedrl fit`` would build; the module is only needed for the initial adapter and to export the final one.
Outputs go where ``fedrl fit`` puts them, under ``trainer.output_dir``: ``checkpoints/round-NNNNNN/``,
``metrics.csv`` and TensorBoard logs, ``curves.png`` and the PEFT ``adapter/``. A restarted ServerApp (same config,
``ckpt-path = "last"``) continues after the newest valid checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedrl_lightning.flower import records
from fedrl_lightning.flower.settings import FlowerSettings, build
from fedrl_lightning.flower.strategy import FedRLStrategy
from fedrl_lightning.plots import plot_run

log = logging.getLogger(__name__)


def make_strategy(trainer: Any, data: Any, settings: FlowerSettings) -> FedRLStrategy:
    """The strategy for a ``FederatedTrainer``'s server-side settings (aggregation, selector, faults, evaluation)."""
    min_nodes = settings.min_nodes or len(data.client_ids())
    return FedRLStrategy(
        aggregation=trainer.aggregation,
        callbacks=trainer.fabric._callbacks,
        selector=trainer.selector,
        checkpoint_dir=trainer.checkpoint_dir,
        keep_checkpoints=trainer.keep_checkpoints,
        ckpt_path=settings.ckpt_path,
        min_available_nodes=min_nodes,
        node_wait_timeout=settings.node_wait_timeout,
        min_clients=trainer.min_clients,
        round_retries=trainer.round_retries,
        eval_every=trainer.eval_every,
        eval_before_training=trainer.eval_before_training,
        loggers=trainer.fabric.loggers,
    )


def run_server(grid: Grid, settings: FlowerSettings) -> tuple[Result, FedRLStrategy]:
    """Build the server from ``settings``, run or resume the rounds on ``grid``, and write the outputs."""
    trainer, module, data = build(settings, "--trainer.progress", "false")
    strategy = make_strategy(trainer, data, settings)
    initial = module.trainable_state()
    strategy.dtypes = {k: v.dtype for k, v in initial.items()}
    result = strategy.start(
        grid, records.to_record(initial), num_rounds=trainer.num_rounds, timeout=settings.round_timeout
    )
    module.save_adapter(trainer.output_dir / "adapter", strategy.global_state)
    if trainer.save_merged:
        module.save_merged(trainer.output_dir / "merged", strategy.global_state)
    plot_run(strategy.history, trainer.output_dir / "curves.png")
    log.info("fedrl-lightning on Flower: %d rounds done, outputs in %s", strategy.round_idx, trainer.output_dir)
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
