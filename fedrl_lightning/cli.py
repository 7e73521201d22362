"""``fedrl fit -c configs/x.yaml``: LightningCLI driving the FederatedTrainer.

LightningCLI only accepts Lightning's own Trainer as ``trainer_class``, so the trainer is registered with plain
jsonargparse class arguments instead; everything else (``-c``, ``--print_config``, dotted overrides such as
``--trainer.num_rounds 5``, ``class_path`` selection) is LightningCLI's. ``fedrl eval`` and ``fedrl export`` (a
finished run's adapter) are plain argparse commands in ``fedrl_lightning.export``.

Defaults a federated user expects: ``trainer.aggregation`` is FedAvg (``null`` = local-only), ``trainer.accelerator``
is ``auto``, and one top-level ``seed`` fills ``trainer.seed``, ``model.init_args.seed`` and ``data.init_args.seed``
where they are not given. ``auto`` accelerator and model dtype are resolved before ``config.yaml`` is written, so it
records what ran (``cuda``/``bfloat16`` on a CUDA machine, ``cpu``/``float32`` elsewhere).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedrl_lightning import rundir
from fedrl_lightning.data import FederatedData
from fedrl_lightning.errors import EXIT_STOPPED, EXIT_USAGE
from fedrl_lightning.modules.policy import PolicyModule
from fedrl_lightning.trainer import FederatedTrainer

DESCRIPTION = (
    "fedrl-lightning: federated RL fine-tuning (GRPO, PPO) of LLMs. `fedrl fit -c CONFIG` trains (below); "
    "`fedrl eval RUN_DIR` prints a finished run's held-out accuracy per client; `fedrl export RUN_DIR --output DIR` "
    "writes its merged model. Each takes --help."
)


class FedRLCLI(LightningCLI):
    """LightningCLI with one subcommand, ``fit``, over ``FederatedTrainer``, a policy module and a data module.

    ``build_trainer = False`` (a subclass's choice, e.g. Flower's apps, which build a server or a client instead)
    leaves ``self.trainer`` as the trainer's parsed arguments, its nested classes built.
    """

    build_trainer = True

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=PolicyModule,
            datamodule_class=FederatedData,
            subclass_mode_model=True,
            trainer_class=FederatedTrainer,
            save_config_callback=None,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            # allow_abbrev=False: ``--trainer.num_round 3`` is an error, not silently ``num_rounds``.
            parser_kwargs={"fit": {"default_config_files": []}, "allow_abbrev": False, "description": DESCRIPTION},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"module", "data"}}

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_default_arguments_to_parser(parser)
        parser.add_argument(
            "--seed",
            type=int | None,
            default=None,
            help="One seed for the run: fills trainer.seed, model.init_args.seed and data.init_args.seed where those "
            "are not given (they override it), and seed_everything where that is false.",
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(FederatedTrainer, "trainer", fail_untyped=False, instantiate=self.build_trainer)
        # Federated by default: FedAvg unless the config says otherwise (``aggregation: null`` = local-only).
        parser.set_defaults(
            {"trainer.aggregation": {"class_path": "fedrl_lightning.aggregation.FedAvg"}, "trainer.accelerator": "auto"}
        )
        parser.add_lightning_class_args(PolicyModule, "model", subclass_mode=True)
        # Any data module (``FederatedData`` when ``data`` has no ``class_path``, e.g. ``FedGRPOData`` for FedGRPO).
        parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=False)
        parser.set_defaults({"data": {"class_path": "fedrl_lightning.data.FederatedData"}})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        seed = config.pop("seed", None)  # not kept: the seeds it filled are, and older runs' settings lack it
        if seed is not None:
            apply_seed(config, seed, explicit=self._explicit(parser, args))
        resolve_auto(config)

    @staticmethod
    def _explicit(parser: LightningArgumentParser, args: Any) -> Namespace:
        """What the command line and the config files set, without the defaults (to tell an explicit seed apart)."""
        if isinstance(args, dict | Namespace):
            return parser.parse_object(args, defaults=False)
        return parser.parse_args(args, defaults=False)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # jsonargparse already built it from the ``trainer`` group (or left its arguments, see ``build_trainer``).
        return self._get(self.config_init, "trainer")

    def before_fit(self) -> None:
        """Hand the trainer the resolved config: it is written to ``config.yaml`` once the output directory is the
        run's (locked, resume allowed), and its settings are stored with each checkpoint."""
        text = self._parser("fit").dump(self.config["fit"], skip_none=False)
        self.trainer.config_yaml = text
        self.trainer.settings = rundir.settings(yaml.safe_load(text))

    def fit(self, model: PolicyModule, datamodule: FederatedData, ckpt_path: str | None = "last", **_: Any) -> None:
        self.trainer.fit(model, datamodule, ckpt_path=ckpt_path)


SEEDED = ("trainer.seed", "model.init_args.seed", "data.init_args.seed")
"""The seeds the top-level ``seed`` fills where not given explicitly."""


def apply_seed(config: Namespace, seed: int, explicit: Namespace) -> None:
    """Fill ``SEEDED`` keys (those the chosen classes have) and a false ``seed_everything`` with ``seed``."""
    subcommand = explicit.get("subcommand")
    explicit = explicit[subcommand] if subcommand else explicit
    for key in SEEDED:
        if key in config and explicit.get(key) is None:
            config[key] = seed
    if config.get("seed_everything") is False:
        config["seed_everything"] = seed


def resolve_auto(config: Namespace) -> None:
    """``auto`` accelerator -> ``cuda`` where CUDA is available, else ``cpu``; then an ``auto`` model dtype ->
    ``bfloat16`` on CUDA (where supported), else ``float32``. Resolved here, the run's config records them."""
    accelerator = config.get("trainer.accelerator")
    if accelerator == "auto":
        accelerator = config["trainer.accelerator"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config.get("model.init_args.dtype") == "auto":
        cuda = accelerator in ("cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        config["model.init_args.dtype"] = "bfloat16" if cuda else "float32"


# Errors a user fixes in their input: printed in a line or two, no traceback, exit 2. A bug elsewhere keeps its
# traceback. UnicodeDecodeError and json's errors are ValueErrors; a full disk or an unwritable path are OSErrors.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
_WRAPPED_CLASS = re.compile(r"class_path='([\w.]+)'")


def _raised_by_parser(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def describe(err: BaseException) -> str:
    """The user's error in one or two lines: the innermost cause, prefixed by the class being built, if any."""
    chain = [err]
    while True:
        last = chain[-1]
        nxt = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    # The outermost error raised outside the parser: jsonargparse wraps a class's error in its own, while a
    # project error may wrap a library's (a JSON decode error inside "file: line 2: invalid JSON").
    innermost = next((e for e in chain if isinstance(e, USER_ERRORS) and not _raised_by_parser(e)), chain[-1])
    where = next((m.group(1) for e in chain if (m := _WRAPPED_CLASS.search(str(e)))), None)
    message = str(innermost).strip() or type(innermost).__name__
    if isinstance(innermost, OSError) and innermost.filename and str(innermost.filename) not in message:
        message = f"{message}: {innermost.filename}"
    return f"{where.rsplit('.', 1)[-1]}: {message}" if where and where not in message else message


def main(args: list[str] | None = None) -> None:
    """Console entry point ``fedrl``: ``fit`` (LightningCLI), ``eval`` and ``export`` (``fedrl_lightning.export``).
    Exit codes: 0 all rounds done, 2 bad input (one line, ``--debug`` or ``FEDRL_DEBUG=1`` for the traceback), 3 the
    federation stopped early (its last checkpoint stays)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("FEDRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["eval"], ["export"]):
        _run_or_exit(lambda: _export_main(argv), debug)
        return
    if args is None:  # LightningCLI reads sys.argv itself (and warns when also given args)
        sys.argv[1:] = argv
    else:  # called from Python with its own arguments, as LightningCLI's warning suggests
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = _run_or_exit(lambda: FedRLCLI(args=None if args is None else argv), debug)
    trainer = getattr(cli, "trainer", None)
    if getattr(trainer, "stopped", None):
        sys.exit(EXIT_STOPPED)


def _export_main(argv: list[str]) -> None:
    from fedrl_lightning import export

    export.main(argv)


def _run_or_exit(fn: Callable[[], Any], debug: bool) -> Any:
    """``fn()``; a user's error is one line on stderr and exit 2 (its traceback only with ``debug``)."""
    try:
        return fn()
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"fedrl: error: {describe(err)}", file=sys.stderr)
        print("fedrl: (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
