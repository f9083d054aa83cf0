"""What the geometry callbacks (StelLA, landing, ALLoRA) share: the method they serve, the
constrained factors it declares (:class:`app.adapters.contract.Constraint`), their tall form,
and the checks that need the built model and optimizer (factor dtype, weight decay). The
strategy and precision refusals are the method's declaration, checked by
:mod:`app.adapters.checks`."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from app.adapters.checks import check_trainer
from app.adapters.contract import Method
from app.errors import ConfigError


def tall(t: Tensor) -> Tensor:
    """The tall (``rows >= cols``) view of a 2-D tensor: itself or its transpose."""
    return t if t.shape[0] >= t.shape[1] else t.transpose(0, 1)


def select_factors(pl_module: L.LightningModule, patterns: Sequence[str], owner: str,
                   option: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable 2-D parameters whose name contains one of ``patterns``.

    Raises:
        ConfigError: If none matches (the adapter does not have these factors).
    """
    found = [(n, p) for n, p in pl_module.named_parameters()
             if p.requires_grad and p.ndim == 2 and any(pat in n for pat in patterns)]
    if not found:
        adapter = getattr(pl_module, "adapter", None)
        raise ConfigError(
            f"{owner}: no trainable parameter matches {option}={list(patterns)} "
            f"(adapter: {type(adapter).__name__ if adapter is not None else 'none'}); "
            "use the method's adapter or change the patterns")
    return found


def tall_local(t: Tensor) -> Tensor:
    """This rank's rows of the tall form of a 2-D factor (or gradient).

    Whole tensors: :func:`tall`. FSDP2 ``DTensor`` s: the local shard, transposed when the
    *global* factor is wide (the orientation never depends on the shard's own shape).

    Raises:
        ConfigError: If the ``DTensor`` is not sharded along the factor's long dimension.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return tall(t)
    long_dim = 0 if t.shape[0] >= t.shape[1] else 1
    if any(not (isinstance(p, Shard) and p.dim == long_dim)
           for p in t.placements if not p.is_replicate()):
        raise ConfigError(
            f"a constrained factor of shape {tuple(t.shape)} is sharded as {t.placements}; "
            "it must be sharded along its long dimension (configs/strategy/fsdp2.yaml)")
    x = t.to_local()
    return x if long_dim == 0 else x.transpose(0, 1)


def reducer_for(params: Sequence[Tensor]) -> object | None:
    """An in-place all-reduce (:class:`app.manifolds.sharded.AllReduce`) over the group that
    shards ``params`` (FSDP2), or ``None`` when they are whole tensors."""
    from torch.distributed.tensor import DTensor

    from app.manifolds.sharded import AllReduce

    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    return AllReduce(sharded[0].device_mesh.get_group())


def check_factor_dtypes(factors: Sequence[tuple[str, Tensor]], owner: str) -> None:
    """Every factor must be a float32 / float64 parameter (the optimizer's master weight)."""
    bad = [(n, p.dtype) for n, p in factors if p.dtype not in (torch.float32, torch.float64)]
    if bad:
        raise ConfigError(
            f"{owner}: factor {bad[0][0]} is {bad[0][1]}; the manifold factors must be fp32 "
            "parameters (trainer.precision=bf16-mixed or 32-true)")


def optimizers_holding(trainer: L.Trainer, params: Sequence[Tensor], owner: str
                       ) -> list[torch.optim.Optimizer]:
    """The optimizers that hold at least one of ``params``; every param must be held."""
    wanted = {id(p) for p in params}
    holding, seen = [], set()
    for optimizer in trainer.optimizers:
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if ids & wanted:
            holding.append(optimizer)
            seen |= ids & wanted
    if seen != wanted:
        raise ConfigError(f"{owner}: {len(wanted - seen)} factor(s) are in no optimizer; "
                          "configure_optimizers must include every trainable factor")
    return holding


def check_no_weight_decay(trainer: L.Trainer, factors: Sequence[tuple[str, Tensor]],
                          owner: str) -> None:
    """Refuse an optimizer group that applies weight decay to a constrained factor.

    Decay shrinks ``X`` off the manifold (and, for Adam's L2 form, pollutes the moments);
    StelLA and Manifold-LoRA keep their constrained factors out of decay.
    """
    names = {id(p): n for n, p in factors}
    for optimizer in trainer.optimizers:
        for index, group in enumerate(optimizer.param_groups):
            if float(group.get("weight_decay", 0.0) or 0.0) <= 0.0:
                continue
            hit = [names[id(p)] for p in group["params"] if id(p) in names]
            if hit:
                raise ConfigError(
                    f"{owner}: optimizer group {index} applies weight_decay="
                    f"{group['weight_decay']} to constrained factor {hit[0]} (and {len(hit) - 1}"
                    " more); keep the factors out of decay (the method's spec.no_decay) "
                    "or set model.init_args.optimizer weight_decay: 0")


def module_method(pl_module: L.LightningModule) -> Method | None:
    """The module's method (:attr:`app.modules.adapted.AdaptedModule.method`), or one resolved
    from its ``adapter`` attribute; ``None`` for a module with neither."""
    method = getattr(pl_module, "method", None)
    if isinstance(method, Method):
        return method
    if not hasattr(pl_module, "adapter"):
        return None
    from app.adapters import resolve_method

    return resolve_method(pl_module.adapter)


def check_fit_setup(trainer: L.Trainer, pl_module: L.LightningModule, owner: str,
                    config_cls: type, hint: str = "") -> object | None:
    """The start-up checks every geometry callback runs in ``setup("fit")``.

    Refuses what ``config_cls.spec`` does not support (strategy, precision:
    :func:`app.adapters.checks.check_trainer`) and, for modules with an ``adapter``
    attribute, an adapter that is not a ``config_cls`` (the callback would constrain factors
    that do not exist or mean something else).

    Returns:
        The module's adapter config (``None`` for modules without one).
    """
    check_trainer(config_cls.spec, trainer)
    if not hasattr(pl_module, "adapter"):
        return None
    adapter = pl_module.adapter
    if not isinstance(adapter, config_cls):
        got = type(adapter).__name__ if adapter is not None else "none (full FT)"
        raise ConfigError(
            f"{owner} needs model.init_args.adapter class_path "
            f"{config_cls.__module__}.{config_cls.__qualname__}{hint}, got {got}")
    return adapter


def hidden_size_of(pl_module: L.LightningModule) -> int | None:
    """``hidden_size`` of the module's Hugging Face config (``pl_module.model.config``)."""
    config = getattr(getattr(pl_module, "model", None), "config", None)
    if config is None:
        config = getattr(pl_module, "hf_config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else None
