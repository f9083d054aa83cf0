"""Start-up checks of an optimizer factory against the adapter and the model it will train.

GaLore and GaRare (:mod:`app.optim.galore`) are optimizers over the full weights: combined with
an adapter they would project the gradients of tiny adapter factors (or nothing), which is not
the method. Bad targets or ranks would otherwise only fail when ``configure_optimizers`` runs,
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
from app.optim.galore import _ProjectedAdamW

__all__ = ["check_optimizer_adapter", "check_optimizer_strategy", "optimizer_class"]

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


def check_optimizer_adapter(
    optimizer_factory: Callable[..., torch.optim.Optimizer] | Any,
    adapter: object | None,
    model: torch.nn.Module | None = None,
) -> None:
    """Refuse optimizer / adapter / model combinations that cannot work, before training.

    For GaLore / GaRare factories (:class:`~app.optim.galore.GaLoreAdamW`,
    :class:`~app.optim.galore.GaRareAdamW` and subclasses); other optimizers pass unchecked.

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
    cls = optimizer_class(optimizer_factory)
    if cls is None or not issubclass(cls, _ProjectedAdamW):
        return
    if adapter is not None:
        raise ConfigError(
            f"{_OPTION}: {cls.__name__} with adapter {type(adapter).__name__}: GaLore/GaRare "
            "optimise full weights; set model.init_args.adapter: null")
    if model is None:
        return
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        optimizer_factory([{"params": params}])
    except ValueError as err:
        raise ConfigError(f"{_OPTION}.init_args ({cls.__name__} on {type(model).__name__}): "
                          f"{err}") from None


def check_optimizer_strategy(
    optimizer_factory: Callable[..., torch.optim.Optimizer] | Any, strategy: object
) -> None:
    """Refuse GaLore / GaRare under a strategy that shards parameters, before the model is built.

    The projection needs whole rows or columns of each targeted weight's gradient. FSDP
    (``FSDPStrategy``; with ``use_orig_params`` each rank sees flat 1-D shards, so the optimizer
    would silently find no 2-D weight), a plain ``ModelParallelStrategy`` and DeepSpeed are
    refused. DDP, single-device runs and :class:`app.fsdp2.AdapterFSDP2Strategy` (weights
    sharded along their long side; :mod:`app.optim.sharded_projection`) are supported.

    Args:
        optimizer_factory: The module's ``optimizer`` (an ``OptimizerCallable``).
        strategy: ``trainer.strategy``.

    Raises:
        ConfigError: Naming the strategy and what to use instead.
    """
    cls = optimizer_class(optimizer_factory)
    if cls is None or not issubclass(cls, _ProjectedAdamW):
        return
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    from app.fsdp2 import AdapterFSDP2Strategy

    if isinstance(strategy, AdapterFSDP2Strategy):
        if cls.__name__ == "GaRareAdamW":  # long-side shards: local projection, no collective
            return
        raise ConfigError(
            f"{_OPTION}: {cls.__name__} does not support trainer.strategy="
            f"{type(strategy).__name__} yet: its sharded subspace refresh (the all-reduced "
            "short-side Gram matrix, app.optim.sharded_projection) does not yet reproduce a "
            "single-process run; use trainer.strategy=ddp (configs/strategy/ddp.yaml), or "
            "GaRare (configs/methods/garare.yaml) under FSDP2")
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
        raise ConfigError(
            f"{_OPTION}: {cls.__name__} does not support trainer.strategy="
            f"{type(strategy).__name__}: it projects each targeted weight's gradient matrix "
            "by rows or columns, and this strategy flattens or splits them arbitrarily; use "
            "FSDP2 (configs/strategy/fsdp2.yaml: weights sharded along their long side) or "
            "trainer.strategy=ddp (configs/strategy/ddp.yaml, every rank keeps full weights)")
