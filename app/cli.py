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
from app.callbacks.run_guard import RunGuard
from app.callbacks.save_adapter import SaveAdapter
from app.errors import ConfigError, RunError

# PEFT configs are dataclasses; without this jsonargparse would not honour `class_path`.
jsonargparse.set_parsing_settings(subclasses_enabled=[PeftConfig, AdapterConfig])


class AppCLI(LightningCLI):
    """LightningCLI with value links between data and model and two forced callbacks.

    - ``model.init_args.checkpoint`` -> ``data.init_args.checkpoint`` (the tokenizer),
    - ``data.init_args.task`` -> ``model.init_args.task``,
    - ``data.num_labels`` -> ``model.init_args.num_labels`` (at instantiation);
    - image data: ``data.init_args.test_domains`` -> ``model.init_args.test_domains``, and
      ``data.class_names`` / ``data.domain_names`` -> the model's (at instantiation);
    - ``checkpoint:`` configures the ModelCheckpoint (best ``val/score`` and last),
    - ``save_adapter:`` the PEFT export at the end of ``fit``;
    - ``run_guard:`` non-finite loss stop and graceful Ctrl-C / SIGTERM (resumable last.ckpt).
    """

    def add_arguments_to_parser(self, parser: jsonargparse.ArgumentParser) -> None:
        parser.link_arguments("model.init_args.checkpoint", "data.init_args.checkpoint")
        parser.link_arguments("data.init_args.task", "model.init_args.task")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels",
                              apply_on="instantiate")
        # Image data only. jsonargparse skips a link whose source the chosen data class lacks
        # (GLUE, SQuAD) and one whose target the model lacks, so these are safe for every task.
        parser.link_arguments("data.init_args.test_domains", "model.init_args.test_domains")
        parser.link_arguments("data.class_names", "model.init_args.class_names",
                              apply_on="instantiate")
        parser.link_arguments("data.domain_names", "model.init_args.domain_names",
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
        parser.add_lightning_class_args(RunGuard, "run_guard")


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
    that match nothing, ...) is printed as one ``error:`` line with exit status 2, a
    :class:`app.errors.RunError` (diverged loss) likewise with status 1.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        build_cli(args)
    except Exception as err:
        known = _find_known_error(err)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        raise SystemExit(2 if isinstance(known, ConfigError) else 1) from None


def _find_known_error(err: BaseException | None) -> ConfigError | RunError | None:
    """The ConfigError / RunError behind ``err``; jsonargparse wraps errors raised while
    instantiating."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError | RunError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
