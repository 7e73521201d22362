"""``fedrl fit -c configs/x.yaml``: LightningCLI driving the FederatedTrainer.

LightningCLI only accepts Lightning's own Trainer as ``trainer_class``, so the trainer is registered with plain
jsonargparse class arguments instead; everything else (``-c``, ``--print_config``, dotted overrides such as
``--trainer.num_rounds 5``, ``class_path`` selection) is LightningCLI's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedrl_lightning.data import FederatedData
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
            parser_kwargs={"fit": {"default_config_files": []}},
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
        """Save the resolved config beside the run's outputs."""
        out = Path(self.trainer.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        parser = self._parser("fit")
        (out / "config.yaml").write_text(parser.dump(self.config["fit"], skip_none=False))

    def fit(self, model: PolicyModule, datamodule: FederatedData, ckpt_path: str | None = "last", **_: Any) -> None:
        self.trainer.fit(model, datamodule, ckpt_path=ckpt_path)


def main(args: Any = None) -> None:
    """Console entry point ``fedrl``."""
    FedRLCLI(args=args)


if __name__ == "__main__":
    main()
