"""``fedrl fit -c configs/x.yaml``: LightningCLI driving the FederatedTrainer.

LightningCLI only accepts Lightning's own Trainer as ``trainer_class``, so the trainer is registered with plain
jsonargparse class arguments instead; everything else (``-c``, ``--print_config``, dotted overrides such as
``--trainer.num_rounds 5``, ``class_path`` selection) is LightningCLI's.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

import yaml
from lightning import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedrl_lightning import rundir
from fedrl_lightning.data import FederatedData
from fedrl_lightning.errors import EXIT_STOPPED, EXIT_USAGE
from fedrl_lightning.modules.policy import PolicyModule
from fedrl_lightning.trainer import FederatedTrainer


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
            parser_kwargs={"fit": {"default_config_files": []}, "allow_abbrev": False},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"module", "data"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(FederatedTrainer, "trainer", fail_untyped=False, instantiate=self.build_trainer)
        parser.add_lightning_class_args(PolicyModule, "model", subclass_mode=True)
        # Any data module (``FederatedData`` when ``data`` has no ``class_path``, e.g. ``FedGRPOData`` for FedGRPO).
        parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=False)
        parser.set_defaults({"data": {"class_path": "fedrl_lightning.data.FederatedData"}})

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
    """Console entry point ``fedrl``. Exit codes: 0 all rounds done, 2 bad input (one line, ``--debug`` or
    ``FEDRL_DEBUG=1`` for the traceback), 3 the federation stopped early (its last checkpoint stays)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("FEDRL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if args is None:  # LightningCLI reads sys.argv itself (and warns when also given args)
        sys.argv[1:] = argv
    else:  # called from Python with its own arguments, as LightningCLI's warning suggests
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        cli = FedRLCLI(args=None if args is None else argv)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"fedrl: error: {describe(err)}", file=sys.stderr)
        print("fedrl: (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    trainer = getattr(cli, "trainer", None)
    if getattr(trainer, "stopped", None):
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()
