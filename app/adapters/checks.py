"""The start-up checks every method goes through, read from its declaration.

One place for the refusals that depend on the method: the strategy
(:attr:`MethodSpec.strategies <app.adapters.contract.MethodSpec>`), the precision
(``precisions``) and the callbacks it needs (``callbacks``, plus the
:class:`~app.adapters.contract.Constraint`'s ``callback``: a run without one is told so at
start-up, since a control run without the constraint is a legitimate experiment). The task
modules run them in ``configure_model`` (before anything is loaded) and the geometry callbacks
in ``setup`` (so a callback used on its own refuses the same way); every message names the
option to change.

Rules that hold for every method live here too: a plain ``ModelParallelStrategy`` is refused
by the task modules, which do not shard the model in ``configure_model``; FSDP2 goes through
:class:`app.fsdp2.AdapterFSDP2Strategy` (kind ``fsdp2``), which each method declares or not.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from app.adapters.contract import (
    FP32_MASTER_PRECISIONS,
    Constraint,
    MethodSpec,
    strategy_kind,
)
from app.errors import ConfigError

__all__ = ["check_precision", "check_strategy", "check_trainer", "missing_callbacks"]


def check_strategy(spec: MethodSpec, strategy: object, module_name: str | None = None) -> None:
    """Refuse a strategy the method (then the task module ``module_name``) cannot train with.

    Raises:
        ConfigError: Naming the strategy, why, and what to use instead.
    """
    name = type(strategy).__name__
    kind = strategy_kind(strategy)
    if kind not in spec.strategies:
        why = dict(spec.kind_reasons).get(kind, f": {spec.strategy_reason}")
        raise ConfigError(f"{spec.strategy_owner or spec.name} does not support "
                          f"trainer.strategy={name}{why}")
    if module_name is not None and kind == "model_parallel":
        raise ConfigError(
            f"{module_name} does not support trainer.strategy={name} (FSDP2 / tensor "
            "parallelism) directly: the model is not sharded in configure_model and "
            "checkpoints hold only the adapter; use FSDP2 through configs/strategy/fsdp2.yaml "
            "(app.fsdp2.AdapterFSDP2Strategy), or trainer.strategy=ddp "
            "(configs/strategy/ddp.yaml)")


def check_precision(spec: MethodSpec, precision: object) -> None:
    """Refuse a ``trainer.precision`` the method does not declare.

    For methods that need fp32 master weights (``bf16-true`` / ``16-true`` store the factors
    in 16 bits, where a retraction's orthonormality, ~1e-7 in fp32, is lost to rounding,
    ~1e-3; fp16 AMP with a loss scaler is not supported either), ``bf16-mixed`` is the
    mixed-precision choice.
    """
    value = str(precision)
    if spec.precisions is None or value in spec.precisions:
        return
    owner = spec.precision_owner or spec.name
    if spec.precisions == FP32_MASTER_PRECISIONS:
        raise ConfigError(
            f"{owner} needs fp32 master weights for the manifold factors but "
            f"trainer.precision={value!r}; use trainer.precision=bf16-mixed (fp32 "
            "parameters, bf16 compute) or 32-true")
    raise ConfigError(f"{owner} does not support trainer.precision={value!r}; use one of "
                      f"{list(spec.precisions)}")


def check_trainer(spec: MethodSpec, trainer: object, module_name: str | None = None) -> None:
    """:func:`check_strategy` and :func:`check_precision` for ``trainer``."""
    check_strategy(spec, trainer.strategy, module_name)  # type: ignore[attr-defined]
    check_precision(spec, trainer.precision)  # type: ignore[attr-defined]


def _load(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def needed_callbacks(spec: MethodSpec, constraint: Constraint | None) -> list[str]:
    """Class paths of the callbacks a method needs: its spec's and its constraint's."""
    paths = list(spec.callbacks)
    if constraint is not None and constraint.callback and constraint.callback not in paths:
        paths.append(constraint.callback)
    return paths


def missing_callbacks(spec: MethodSpec, constraint: Constraint | None,
                      present: Iterable[object]) -> list[str]:
    """Class paths of the callbacks the method needs that ``present`` lacks.

    Args:
        spec: The method's declaration (``callbacks``).
        constraint: Its constraint (its ``callback`` is needed too).
        present: ``trainer.callbacks``.
    """
    paths = needed_callbacks(spec, constraint)
    have = list(present)
    out = []
    for path in paths:
        cls = _load(path)
        if not any(isinstance(cb, cls) for cb in have):
            out.append(path)
    return out
