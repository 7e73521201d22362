"""How a Flower run's configuration reaches our objects: the run config names YAML configs and ``fedrl fit`` flags.

The Flower run config (``[tool.flwr.app.config]`` of the app's pyproject, ``flwr run --run-config``) stays small:
it points at our own YAML configs, and the trainer, module, data, aggregator and callbacks are built from them by
the same LightningCLI parser as ``fedrl fit`` (``class_path`` selection, dotted overrides, the same errors for a
mistyped key). Server and clients read the same run config, so they build the same module and aggregator.

Keys (hyphenated, as Flower spells run config keys):

- ``config``: one or more YAML files, space-separated, applied in order like repeated ``fedrl fit -c``. A relative
  path is looked up in the working directory, then in the source checkout this package was installed from
  (``configs/`` of an editable install); Flower starts its app processes in directories of its own, so prefer
  absolute paths in a deployment.
- ``overrides``: ``fedrl fit`` flags, e.g. ``"--trainer.num_rounds 5 --model.init_args.learning_rate 1e-4"``.
- ``ckpt-path``: server resume: ``last`` (the newest valid checkpoint under ``trainer.output_dir``), a checkpoint
  directory, or ``none`` to start over.
- ``client-state-dir``: where each client keeps its private state; empty = ``<trainer.output_dir>/clients``. A
  SuperNode's ``--node-config 'state-dir=...'`` takes precedence (each site has its own disk).
- ``min-nodes``: SuperNodes to wait for before each round; 0 = the config's number of clients.
- ``node-wait-timeout``: seconds to wait for them before the run fails (Flower's own sampler waits forever).
- ``round-timeout``: seconds the server waits for the replies of one round (or of one evaluation).
"""

from __future__ import annotations

import shlex
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules.policy import PolicyModule

DEFAULTS: dict[str, Any] = {
    "config": "configs/tiny.yaml",
    "overrides": "",
    "ckpt-path": "last",
    "client-state-dir": "",
    "min-nodes": 0,
    "node-wait-timeout": 600.0,
    "round-timeout": 3600.0,
}
"""The run config keys and their defaults (the example app's ``pyproject.toml`` lists the same)."""

# The source checkout of an editable install: where ``configs/`` lives next to the package.
_CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FlowerSettings:
    """The Flower run config, typed.

    Attributes:
        config: YAML config files, in order.
        overrides: ``fedrl fit`` flags applied after the files.
        ckpt_path: ``last``, a checkpoint directory, or None (start over).
        client_state_dir: root of the clients' private state; None = ``<trainer.output_dir>/clients``.
        min_nodes: SuperNodes a round waits for; 0 = the config's number of clients.
        node_wait_timeout: seconds to wait for ``min_nodes`` SuperNodes.
        round_timeout: seconds to wait for a round's replies.
    """

    config: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    ckpt_path: str | None = "last"
    client_state_dir: str | None = None
    min_nodes: int = 0
    node_wait_timeout: float = 600.0
    round_timeout: float = 3600.0

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> FlowerSettings:
        """Settings from a Flower run config, over ``defaults`` (e.g. given to ``build_client_app``), over ``DEFAULTS``.

        Raises:
            ValueError: for a key this adapter does not know (a typo would otherwise be ignored silently).
        """
        merged = {**DEFAULTS, **(defaults or {}), **dict(run_config)}
        unknown = set(merged) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Flower run config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        ckpt = str(merged["ckpt-path"]).strip()
        return cls(
            config=tuple(shlex.split(str(merged["config"]))),
            overrides=tuple(shlex.split(str(merged["overrides"]))),
            ckpt_path=None if ckpt.lower() in ("", "none", "null") else ckpt,
            client_state_dir=str(merged["client-state-dir"]) or None,
            min_nodes=int(merged["min-nodes"]),
            node_wait_timeout=float(merged["node-wait-timeout"]),
            round_timeout=float(merged["round-timeout"]),
        )

    def cli_args(self, *extra: str) -> list[str]:
        """The ``fedrl fit`` arguments: ``-c`` per config file, the overrides, then ``extra``."""
        if not self.config:
            raise ValueError("the Flower run config names no YAML config (key 'config')")
        args: list[str] = []
        for name in self.config:
            args += ["-c", str(resolve_config(name))]
        return args + list(self.overrides) + list(extra)


def resolve_config(name: str) -> Path:
    """A config path: as given if it exists, else relative to the source checkout.

    Raises:
        FileNotFoundError: naming both places looked in.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_absolute() and (_CHECKOUT / path).is_file():
        return _CHECKOUT / path
    raise FileNotFoundError(f"Flower run config 'config': {name!r} is neither a file here nor under {_CHECKOUT}")


class _ArgumentsOnly(FedRLCLI):
    """The ``fedrl fit`` parser, leaving the trainer as its arguments: a Flower app builds a server or a client."""

    build_trainer = False


def build(settings: FlowerSettings, *extra: str) -> tuple[dict[str, Any], PolicyModule, FederatedData]:
    """(the trainer's arguments, module, data) from the settings, parsed as ``fedrl fit`` would (nothing set up).

    The arguments hold the built aggregator, selector, rollout backend and callbacks, by ``FederatedTrainer``'s
    parameter names."""
    with warnings.catch_warnings():
        # Flower's app processes have argv of their own; LightningCLI would warn that it ignores them.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ArgumentsOnly(args=settings.cli_args(*extra), run=False)
    return dict(vars(cli.trainer)), cli.model, cli.datamodule
