"""One start-up validation layer for the options a user sets, run before anything is written.

Three moments, all called from :mod:`app.cli`:

- :func:`check_argv`, before parsing: every ``--config`` / ``--ckpt_path`` file exists (a typo
  would otherwise end in a usage dump or a traceback);
- :func:`check_config`, after parsing, before any class is built: the composed values
  (ranks, learning rate, batch sizes, strategy vs accelerator, precision vs accelerator,
  writable output folders, two method fragments at once);
- :func:`check_built`, after the model, data and trainer objects exist, before ``fit`` /
  ``test`` starts: values that need the model (a rank larger than a targeted layer, targets
  that are not layers an adapter can wrap) or the trainer (a precision Lightning would quietly
  replace).

Each problem raises :class:`app.errors.ConfigError` with one line naming the option, the bad
value and the fix; the CLI prints it as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from app.errors import ConfigError, is_positive_number

#: Option spellings whose value is a file that must exist.
FILE_OPTIONS = ("--config", "-c", "--ckpt_path")
#: Lightning precisions that mean fp16 automatic mixed precision (needs a CUDA device).
FP16_MIXED = ("16", "16-mixed")
#: Option of the adapter's rank and of GaLore / GaRare's projection rank.
ADAPTER = "model.init_args.adapter"
OPTIMIZER = "model.init_args.optimizer"


# -- before parsing -----------------------------------------------------------------------
def check_argv(args: Sequence[str]) -> None:
    """Refuse a ``--config`` or ``--ckpt_path`` that names no file, with close names."""
    args = list(args)
    for i, arg in enumerate(args):
        option, value = arg, None
        if "=" in arg and arg.split("=", 1)[0] in FILE_OPTIONS:
            option, value = arg.split("=", 1)
        elif arg in FILE_OPTIONS and i + 1 < len(args):
            value = args[i + 1]
        if option not in FILE_OPTIONS or value is None:
            continue
        if option == "--ckpt_path" and value in ("last", "best", "hpc", "registry", "null"):
            continue  # Lightning's named checkpoints
        if option != "--ckpt_path" and value.lstrip().startswith(("{", "[")):
            continue  # an inline YAML config
        path = Path(value).expanduser()
        if path.is_file():
            continue
        raise ConfigError(f"{option} {value}: no such file{_close_files(path)}")


def _close_files(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return f" (folder {folder} does not exist)"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    near = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    if near:
        return f"; did you mean {', '.join(str(folder / n) for n in near)}?"
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"; {folder} holds {shown}" if names else f"; {folder} is empty"


# -- after parsing ------------------------------------------------------------------------
def check_config(cfg: Mapping[str, Any], subcommand: str | None) -> None:
    """Check the parsed (not yet instantiated) configuration of ``subcommand``.

    Args:
        cfg: The subcommand's configuration as a plain dict (``Namespace.as_dict()``).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
    """
    check_method_fragments(cfg.get("config") or [])
    model = _init_args(cfg.get("model"))
    adapter = model.get("adapter")
    adapter_args = _init_args(adapter)
    optimizer = _init_args(model.get("optimizer"))
    spec = method_spec(model)
    if spec is not None and spec.rank_field:  # where the method declares its rank
        part, field_name = spec.rank_field.split(".", 1)
        values = adapter_args if part == "adapter" else optimizer
        _check_rank(values.get(field_name), f"model.init_args.{part}.init_args.{field_name}")
    if spec is not None:
        check_method_precision(spec, (cfg.get("trainer") or {}).get("precision"))
    targets = adapter_args.get("target_modules")
    if isinstance(targets, list) and not targets:
        raise ConfigError(f"{ADAPTER}.init_args.target_modules=[] names no layer; list the "
                          "layers to adapt (e.g. [query, value]) or set null for the default")
    lr = optimizer.get("lr")
    if isinstance(lr, int | float) and not is_positive_number(lr):
        raise ConfigError(f"{OPTIMIZER}.init_args.lr={lr} must be a finite number > 0; set e.g. "
                          "lr: 5.0e-4")
    data = _init_args(cfg.get("data"))
    for key in ("batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"data.init_args.{key}={value} must be at least 1"
                              + ("" if "batch" in key else " (or null for every row)"))
    trainer = cfg.get("trainer") or {}
    check_trainer(trainer)


def _class(path: Any) -> type | None:
    if not isinstance(path, str) or "." not in path:
        return None
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(__import__(module_name, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None  # the parser has already refused an unknown class


def method_spec(model: Mapping[str, Any]) -> Any:
    """The method's declaration (:class:`app.adapters.contract.MethodSpec`) for the parsed
    ``model.init_args`` (``None`` when it cannot be told before instantiation)."""
    from app.adapters import declared_spec

    adapter, optimizer = model.get("adapter"), model.get("optimizer")
    adapter_cls = _class(adapter.get("class_path")) if isinstance(adapter, Mapping) else None
    if isinstance(adapter, Mapping) and adapter_cls is None:
        return None
    optimizer_cls = (_class(optimizer.get("class_path"))
                     if isinstance(optimizer, Mapping) else None)
    try:
        return declared_spec(adapter_cls, optimizer_cls)
    except ConfigError:
        return None  # not a method: the module's own check names it


def check_method_precision(spec: Any, precision: Any) -> None:
    """The method's declared ``precisions`` (``app.adapters.checks.check_precision``), on the
    precision Lightning will use, before the trainer is built."""
    if precision is None or spec.precisions is None:
        return
    from lightning.fabric.connector import _convert_precision_to_unified_args

    from app.adapters.checks import check_precision

    try:
        unified = str(_convert_precision_to_unified_args(precision))
    except (ValueError, TypeError):
        return
    check_precision(spec, unified)


def _init_args(node: Any) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        return {}
    return node.get("init_args") or {}


def _check_rank(value: Any, option: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}={value!r}: a rank must be a positive integer; set e.g. 8 "
                          "(at most the smaller side of the targeted layers)")


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Strategy vs accelerator, precision vs accelerator, accumulation, output folder."""
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _has_gpu())
    strategy = trainer.get("strategy") or "auto"
    if isinstance(strategy, str) and strategy != "auto":
        _check_strategy_name(strategy, on_cpu, accelerator)
    precision = str(trainer.get("precision")) if trainer.get("precision") is not None else None
    if precision in FP16_MIXED and on_cpu:
        raise ConfigError(
            f"trainer.precision={precision}: fp16 mixed precision needs a CUDA GPU and "
            f"trainer.accelerator={accelerator} runs on the CPU (Lightning would run bf16-mixed "
            "instead); use trainer.precision=bf16-mixed or 32-true")
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be at least 1")
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and steps < -1:
        raise ConfigError(f"trainer.max_steps={steps} must be -1 (no limit) or at least 0")
    for key in ("max_epochs", "min_epochs", "min_steps", "log_every_n_steps"):
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < (
                -1 if key == "max_epochs" else 0):
            raise ConfigError(f"trainer.{key}={value} must not be negative")
    check_writable(trainer.get("default_root_dir"), "trainer.default_root_dir")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_strategy_name(name: str, on_cpu: bool, accelerator: str) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(
            f"trainer.strategy={name} is not a strategy Lightning knows; "
            + (f"did you mean {', '.join(near)}? " if near else "")
            + "use auto, ddp (configs/strategy/ddp.yaml) or a strategy class_path")
    if on_cpu and re.match(r"(fsdp|deepspeed)", name):
        raise ConfigError(
            f"trainer.strategy={name} needs GPUs (trainer.accelerator=gpu) but "
            f"trainer.accelerator={accelerator} runs on the CPU; on CPU use "
            "trainer.strategy=ddp (configs/strategy/ddp.yaml), on GPUs "
            "configs/strategy/fsdp.yaml for adapters")


def check_writable(folder: Any, option: str) -> None:
    """Refuse an output folder that cannot be created or written, before anything is.

    The nearest existing ancestor must be a folder in which a file can be created (probed with
    a temporary file that is removed at once; ``os.access`` is not enough: it is always true
    for root, even on a read-only file system).
    """
    path = Path(str(folder) if folder is not None else os.getcwd()).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option}={path}: {probe} is a file, not a folder; set {option} to a "
                          "folder you can write")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".geolora-write-probe-")
    except OSError as err:
        raise ConfigError(f"{option}={path} is not writable ({err.strerror}: {probe}); set "
                          f"{option} to a folder you can write") from err
    os.close(fd)
    os.unlink(name)


def method_fragment_keys(path: Path) -> list[str]:
    """The method keys a ``--config`` file sets, if it is a method fragment (else ``[]``).

    A method fragment sets ``model.init_args.adapter`` and/or ``.optimizer`` and no ``data``
    (a complete config, such as a run's ``config.yaml``, sets ``data`` too and may be combined
    with one fragment that swaps its method).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(raw, Mapping) or "data" in raw:
        return []
    init = _init_args(raw.get("model"))
    return [f"model.init_args.{k}" for k in ("adapter", "optimizer") if k in init]


def check_method_fragments(paths: Sequence[Any]) -> None:
    """Refuse two method fragments in one command: the second would silently replace the
    first's adapter and optimizer, or (in the other order) keep the first's callbacks."""
    seen: list[tuple[str, list[str]]] = []
    for entry in paths:
        path = Path(str(getattr(entry, "absolute", entry) or entry))
        keys = method_fragment_keys(path)
        if not keys:
            continue
        if seen:
            first, first_keys = seen[0]
            both = sorted(set(first_keys) & set(keys)) or keys
            raise ConfigError(
                f"--config {entry}: a second method fragment after --config {first} (both set "
                f"{both[0]}); give one method fragment and change single values with options "
                f"such as --{ADAPTER}.init_args.r")
        seen.append((str(entry), keys))


# -- after the objects are built ----------------------------------------------------------
def check_built(model: Any, trainer: Any, requested_precision: Any) -> None:
    """Checks that need the built module (its base model's layers) or trainer.

    Args:
        model: The LightningModule (``AdaptedModule`` subclasses carry ``adapter``,
            ``hf_config`` and ``model_class``; others are skipped).
        trainer: The Trainer.
        requested_precision: ``trainer.precision`` as the user gave it.
    """
    check_precision_kept(requested_precision, trainer)
    adapter = getattr(model, "adapter", None)
    model_class = getattr(model, "model_class", None)
    if adapter is None or not hasattr(model, "hf_config") or model_class is None:
        return
    if not hasattr(model_class, "from_config"):
        model_class = model_class()  # a factory method (older task modules)
    import torch

    with torch.device("meta"):
        base = model_class.from_config(model.hf_config)
    check_rank_fits_targets(base, adapter)


def check_precision_kept(requested: Any, trainer: Any) -> None:
    """Refuse a precision Lightning replaced by another one (``config.yaml`` would record the
    requested one while the run used the other)."""
    if requested is None:
        return
    from lightning.fabric.connector import _convert_precision_to_unified_args

    try:
        want = str(_convert_precision_to_unified_args(requested))
    except (ValueError, TypeError):
        return
    got = str(trainer.precision)
    if want != got:
        raise ConfigError(
            f"trainer.precision={requested}: Lightning would run {got} instead on "
            f"{type(trainer.accelerator).__name__}; set trainer.precision={got} (or 32-true)")


def _targets(base: Any, adapter: Any) -> list[str] | str | None:
    from app.adapters.targets import peft_default_targets

    patterns = getattr(adapter, "target_patterns", None)
    targets = (patterns() if callable(patterns) and not hasattr(adapter, "peft_type")
               else getattr(adapter, "target_modules", None))
    if targets is None:
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        targets = peft_default_targets(model_type)
    if isinstance(targets, set | tuple):
        targets = sorted(targets)
    return targets


def _targeted(base: Any, targets: list[str] | str) -> list[tuple[str, Any]]:
    modules = [(n, m) for n, m in base.named_modules() if n]
    if isinstance(targets, str):
        if targets == "all-linear":
            import torch

            return [(n, m) for n, m in modules if isinstance(m, torch.nn.Linear)]
        return [(n, m) for n, m in modules if re.fullmatch(targets, n)]
    return [(n, m) for n, m in modules
            if any(n == t or n.endswith("." + t) for t in targets)]


def check_rank_fits_targets(base: Any, adapter: Any) -> None:
    """A rank above ``min(in, out)`` of a targeted layer is no longer low rank (and StelLA's
    orthonormal factors cannot exist); targets must be layers an adapter can wrap."""
    import torch

    targets = _targets(base, adapter)
    if not targets:
        return
    option = f"{ADAPTER}.init_args.target_modules"
    matched = _targeted(base, targets)
    wrappable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    bad = [(n, m) for n, m in matched if not isinstance(m, wrappable)
           and type(m).__name__ != "Conv1D"]  # transformers' GPT-2 Conv1D is a linear layer
    if bad:
        name, module = bad[0]
        raise ConfigError(
            f"{option}={targets} matches {name} ({type(module).__name__}), which an adapter "
            "cannot wrap; target linear layers (e.g. [query, value])")
    rank = getattr(adapter, "r", None)
    if not isinstance(rank, int):
        return
    sides = []
    for name, module in matched:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:
            sides.append((min(weight.shape), name, tuple(weight.shape)))
    if not sides:
        return
    smallest, name, shape = min(sides)
    if rank > smallest:
        raise ConfigError(
            f"{ADAPTER}.init_args.r={rank} exceeds min(in, out)={smallest} of the targeted "
            f"layer {name} (weight {shape[0]}x{shape[1]}); set r <= {smallest} (low rank: "
            "usually 4-64)")
