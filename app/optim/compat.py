"""Start-up checks of an optimizer factory against the adapter and the model it will train.

Methods that live in the optimizer declare themselves with a ``spec`` class attribute
(:class:`app.adapters.contract.MethodSpec`); ``full_weights`` ones (GaLore and GaRare,
:mod:`app.optim.galore`) optimise the full weights: combined with an adapter they would project
the gradients of tiny adapter factors (or nothing), which is not the method. Their strategy
refusals are read from the same declaration by :mod:`app.adapters.checks`. Bad targets or
ranks would otherwise only fail when ``configure_optimizers`` runs,
after the model is loaded; here they fail while the CLI instantiates the module, with the option
to change named.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from app.errors import ConfigError

__all__ = ["check_optimizer_adapter", "full_weight_optimizer", "optimizer_class"]

_OPTION = "model.init_args.optimizer"


def _is_optimizer_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)


def optimizer_class(factory: Any) -> type[torch.optim.Optimizer] | None:
    """The optimizer class an optimizer factory builds, if it can be told without calling it.

    Handles an optimizer class itself, ``functools.partial(cls, ...)`` and what LightningCLI /
    jsonargparse make of ``optimizer: {class_path: ..., init_args: ...}`` for an
    ``OptimizerCallable``: ``functools.partial(instantiator, cls, **init_args)``. Plain
    functions (``default_optimizer``) are opaque: ``None``.
    """
    for _ in range(8):  # nested partials
        if _is_optimizer_class(factory):
            return factory
        if not isinstance(factory, functools.partial):
            return None
        found = next((a for a in factory.args if _is_optimizer_class(a)), None)
        if found is not None:
            return found
        factory = factory.func
    return None


def full_weight_optimizer(factory: Any) -> type[torch.optim.Optimizer] | None:
    """The optimizer class of ``factory`` if it declares a ``full_weights`` method, else
    ``None``."""
    cls = optimizer_class(factory)
    spec = getattr(cls, "spec", None)
    return cls if cls is not None and getattr(spec, "full_weights", False) else None


def check_optimizer_adapter(
    optimizer_factory: Callable[..., torch.optim.Optimizer] | Any,
    adapter: object | None,
    model: torch.nn.Module | None = None,
) -> None:
    """Refuse optimizer / adapter / model combinations that cannot work, before training.

    For factories of optimizers that declare a ``full_weights`` method (GaLore / GaRare and
    subclasses, :func:`full_weight_optimizer`); other optimizers pass unchecked.

    1. ``adapter`` must be ``None``: they optimise full weights.
    2. With ``model`` (a meta-device copy is enough; nothing is allocated), the factory is called
       on ``model.named_parameters()`` (one group, exactly the names ``configure_optimizers``
       passes for full fine-tuning), so the optimizer's own validation runs: ``target_modules``
       matching no 2-D weight, ``rank`` above a targeted weight's smaller side, ``rank`` /
       ``update_proj_gap`` < 1, sharded parameters.

    Args:
        optimizer_factory: The module's ``optimizer`` (an ``OptimizerCallable``).
        adapter: The module's ``adapter`` config.
        model: The base model, for the target / rank checks.

    Raises:
        ConfigError: Naming the option to change.
    """
    cls = full_weight_optimizer(optimizer_factory)
    if cls is None:
        return
    if adapter is not None:
        raise ConfigError(
            f"{_OPTION}: {cls.__name__} with adapter {type(adapter).__name__}: "
            f"{cls.spec.name} optimise full weights; set model.init_args.adapter: null")
    if model is None:
        return
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        optimizer_factory([{"params": params}])
    except ValueError as err:
        raise ConfigError(f"{_OPTION}.init_args ({cls.__name__} on {type(model).__name__}): "
                          f"{err}") from None
