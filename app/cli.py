"""The ``lightning-cli`` command: Lightning's CLI with this project's links and defaults.

``lightning-cli fit --config configs/data/glue_rte.yaml --config configs/methods/lora.yaml``
(``python -m app`` is the same). Fragments compose: the data fragment picks the data module
and task module, the model fragment the checkpoint, the method fragment the adapter, optimizer
and callbacks.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from typing import Any

import jsonargparse
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from peft import PeftConfig

from app.adapters import AdapterConfig
from app.callbacks.exact_resume import ExactResume
from app.callbacks.run_guard import RunGuard, exit_status
from app.callbacks.save_adapter import SaveAdapter
from app.errors import ConfigError, RunError
from app.validation import check_argv, check_built, check_config

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

    def parse_arguments(self, parser: jsonargparse.ArgumentParser, args: Any) -> None:
        """Parse; an unknown option is reported with the closest real ones."""
        try:
            super().parse_arguments(parser, args)
        except jsonargparse.ArgumentError as err:
            raise ConfigError(_unknown_init_arg(str(err)) or
                              one_line(str(err)) + _suggest(parser, str(err))) from None

    def _parse_ckpt_path(self) -> None:
        """Lightning re-applies the checkpoint's hyper-parameters over the user's config; for
        ``validate`` / ``test`` / ``predict`` the module's ``evaluation_options`` (decoding
        settings that do not change the trained weights) keep the user's values."""
        sub = self.config.get("subcommand")
        before = self.config[sub].clone() if sub and sub != "fit" else None
        super()._parse_ckpt_path()
        if before is None or not before.get("ckpt_path"):
            return
        keep_evaluation_options(before, self.config[sub])

    def before_instantiate_classes(self) -> None:
        """Validate the parsed options before any object is built or file written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config(config.as_dict(), self.subcommand)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer, then run the checks that need them."""
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_built(self.model, self.trainer, config.get("trainer", {}).get("precision"))


#: Parser settings: no abbreviated options (``--trainer.max_step`` must not be read as
#: ``--trainer.max_steps``), and errors raised (printed by :func:`main` as one line) instead of
#: a usage dump.
PARSER_KWARGS = {"allow_abbrev": False, "exit_on_error": False}


def keep_evaluation_options(user: jsonargparse.Namespace, merged: jsonargparse.Namespace
                            ) -> None:
    """Put the user's values of the model class's ``evaluation_options`` back into ``merged``
    (the config after the checkpoint's hyper-parameters were applied)."""
    model = merged.get("model")
    class_path = model.get("class_path") if model is not None else None
    if not class_path:
        return
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[name]), name, None)
    for option in getattr(cls, "evaluation_options", ()):
        value = user.get(f"model.init_args.{option}")
        if value is None:
            continue
        merged[f"model.init_args.{option}"] = value
        kwargs = model.get("dict_kwargs")
        if kwargs and option in kwargs:
            kwargs[option] = value


def build_cli(args: list[str] | None = None, run: bool = True) -> AppCLI:
    """Parse ``args`` (default: ``sys.argv``), build everything and run the subcommand."""
    per_command = {name: dict(PARSER_KWARGS) for name in LightningCLI.subcommands()}
    return AppCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ExactResume()]},
        parser_kwargs={**PARSER_KWARGS, **per_command},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-cli`` console script.

    A :class:`app.errors.ConfigError` (bad task, missing data, unknown checkpoint, targets
    that match nothing, ...) is printed as one ``error:`` line with exit status 2, a
    :class:`app.errors.RunError` (diverged loss) likewise with status 1. A run stopped by
    SIGTERM (or Ctrl-C) leaves a resumable ``last.ckpt`` and exits with ``128 + signal``:
    143 (130 for Ctrl-C), never 0.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_argv(sys.argv[1:] if args is None else args)
        build_cli(args)
    except SIGTERMException as err:
        raise SystemExit(err.code if isinstance(err.code, int) and err.code else
                         exit_status(signal.SIGTERM)) from None
    except jsonargparse.ArgumentError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        known = _find_known_error(err)
        if known is None:
            raise
        print(f"error: {one_line(str(known))}", file=sys.stderr)
        raise SystemExit(2 if isinstance(known, ConfigError) else 1) from None


def _suggest(parser: jsonargparse.ArgumentParser, message: str) -> str:
    """``; did you mean --x?`` for the unknown options named in ``message``."""
    if "unrecognized arguments" not in message:
        return ""
    given = re.findall(r"(--[\w.\-]+)", message)
    parsers = [parser]
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is not None:
        parsers += list(subcommands._name_parser_map.values())
    options = sorted({o for p in parsers for o in p._option_string_actions})
    hints = [difflib.get_close_matches(g, options, n=1, cutoff=0.8) for g in given]
    hints = [h[0] for h in hints if h]
    if hints:
        return f"; did you mean {', '.join(hints)}? (options are never abbreviated)"
    return "; see --help for the option names"


def _unknown_init_arg(message: str) -> str | None:
    """jsonargparse's many-line report of an unknown ``init_args`` key, as one line."""
    found = re.search(r"Parser key \"(?P<key>[^\"]+)\".*?class_path '(?P<cls>[\w.]+)'.*?"
                      r"Option '(?P<opt>[^']+)' is not accepted", message, re.S)
    if found is None:
        return None
    key, cls_path, option = found["key"], found["cls"], found["opt"]
    try:
        import inspect

        module_name, _, name = cls_path.rpartition(".")
        cls = getattr(__import__(module_name, fromlist=[name]), name)
        names = [n for n in inspect.signature(cls).parameters if n not in ("self", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        names = []
    near = difflib.get_close_matches(option, names, n=2, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}?" if near else f"accepted: {', '.join(names)}"
    return (f"--{key}.init_args.{option}: {cls_path.rsplit('.', 1)[-1]} has no option "
            f"{option!r}; {hint}")


def one_line(message: str, limit: int = 600) -> str:
    """``message`` on one line: jsonargparse's multi-line reasons joined with ``; ``."""
    parts = [re.sub(r"^\s*-\s+", "", line).strip() for line in message.splitlines()]
    text = "; ".join(p for p in parts if p)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
