"""The ``attnzoo`` command (also ``python -m attnzoo``).

    attnzoo fit      --config configs/fmnist/nat_mini.yaml             # train (TensorBoard + CSV logs in runs/)
    attnzoo validate --config configs/fmnist/nat_mini.yaml --ckpt_path runs/.../last.ckpt
    attnzoo test     --config ... --ckpt_path ...
    attnzoo predict  --config ... --ckpt_path ... --data.init_args.predict_files '[shirt.png]' \\
                     --predictions.attention_dir maps/                 # top-k labels (+ attention PNGs)
    attnzoo export   --ckpt_path runs/.../last.ckpt --output exported/ # timm folder: model.safetensors + config.json
    attnzoo models   [--pattern 'attnzoo_nat*'] [--markdown]            # the zoo: name, params, pretrained tags

fit / validate / test / predict are Lightning's CLI (``--help`` on each); the config picks the task
(``model.class_path``: ImageClassifier, DetectionTask, CharLanguageModel, SeriesClassifier) and the data
(``data.class_path``); the data's ``data_info`` is passed to the task. ``--ckpt_path`` resumes ``fit``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from attnzoo.train.data.base import ZooDataModule
from attnzoo.train.predictions import PredictionPrinter
from attnzoo.train.tasks.base import TaskModule

__all__ = ["AttnzooCLI", "main", "run"]


class AttnzooCLI(LightningCLI):
    """LightningCLI over every ``TaskModule`` and ``ZooDataModule``, with the zoo's defaults: seed 0,
    ``checkpoint`` (ModelCheckpoint) and ``predictions`` (PredictionPrinter) settings, and unless
    ``trainer.logger`` is set, CSV + TensorBoard logs in ``<trainer.default_root_dir>/logs/version_<n>/``
    (default root: ``runs/``), with ``checkpoints/`` beside them."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        # Imported so that configs can name the classes by their short names (class_path: ImageClassifier).
        import attnzoo.train.data.detection
        import attnzoo.train.data.images
        import attnzoo.train.data.series
        import attnzoo.train.data.text
        import attnzoo.train.tasks  # noqa: F401

        super().__init__(
            TaskModule,
            ZooDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # each task builds its own from model.init_args.optimizer
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "runs"},
            parser_kwargs={"description": __doc__.split("\n\n")[1]},
            args=args,
            run=run,
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # No abbreviated options: a typo such as --trainer.max_epoch must be an error, not max_epochs.
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.data_info", compute_fn=_data_info, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.filename": "{epoch}-{step}", "checkpoint.save_last": True})
        parser.add_lightning_class_args(PredictionPrinter, "predictions")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") in (None, True):  # the default: CSV and TensorBoard in one version folder
            root = trainer.get("default_root_dir") or "runs"
            csv = CSVLogger(save_dir=root, name="logs")
            kwargs["logger"] = [csv, TensorBoardLogger(save_dir=root, name="logs", version=csv.version)]
        return super().instantiate_trainer(**kwargs)


def _data_info(data: ZooDataModule) -> dict:
    return data.data_info


def run(args: Sequence[str] | None = None) -> AttnzooCLI | None:
    """Run a subcommand in this process; returns the LightningCLI for fit/validate/test/predict, else None."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "export":
        from attnzoo.train.export import export_main

        export_main(args[1:])
        return None
    if args and args[0] == "models":
        from attnzoo.zoo.listing import main as list_models

        list_models(args[1:])
        return None
    return AttnzooCLI(args=args)


def main(args: Sequence[str] | None = None) -> None:
    """The console script; exit status 0 on success (errors exit non-zero)."""
    run(args)


if __name__ == "__main__":
    main()
