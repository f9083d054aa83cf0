"""The ``lightning-cli`` command: Lightning's CLI with this project's links and defaults.

``lightning-cli fit --config configs/data/glue_rte.yaml --config configs/methods/lora.yaml``
(``python -m app`` is the same). Fragments compose: the data fragment picks the data module
and task module, the model fragment the checkpoint, the method fragment the adapter, optimizer
and callbacks.
"""

from __future__ import annotations

import os
import sys

import jsonargparse
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from peft import PeftConfig

from app.adapters import AdapterConfig
from app.callbacks.save_adapter import SaveAdapter
from app.errors import ConfigError

# PEFT configs are dataclasses; without this jsonargparse would not honour `class_path`.
jsonargparse.set_parsing_settings(subclasses_enabled=[PeftConfig, AdapterConfig])


class AppCLI(LightningCLI):
    """LightningCLI with value links between data and model and two forced callbacks.

    - ``model.init_args.checkpoint`` -> ``data.init_args.checkpoint`` (the tokenizer),
    - ``data.init_args.task`` -> ``model.init_args.task``,
    - ``data.num_labels`` -> ``model.init_args.num_labels`` (at instantiation);
    - ``checkpoint:`` configures the ModelCheckpoint (best ``val/score`` and last),
    - ``save_adapter:`` the PEFT export at the end of ``fit``.
    """

    def add_arguments_to_parser(self, parser: jsonargparse.ArgumentParser) -> None:
        parser.link_arguments("model.init_args.checkpoint", "data.init_args.checkpoint")
        parser.link_arguments("data.init_args.task", "model.init_args.task")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels",
                              apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/score",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "step{step}-score{val/score:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(SaveAdapter, "save_adapter")


def build_cli(args: list[str] | None = None, run: bool = True) -> AppCLI:
    """Parse ``args`` (default: ``sys.argv``), build everything and run the subcommand."""
    return AppCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-cli`` console script.

    A :class:`app.errors.ConfigError` (bad task, missing data, unknown checkpoint, targets
    that match nothing, ...) is printed as one ``error:`` line with exit status 2.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        build_cli(args)
    except Exception as err:
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind ``err``; jsonargparse wraps errors raised while instantiating."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
