"""LoRA+ (Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024) as a
declared method: PEFT LoRA whose ``B`` factors learn ``loraplus_lr_ratio`` times faster, with
the optimizer groups built by PEFT's ``peft.optimizers.create_loraplus_optimizer``.

Declaration (:mod:`app.adapters.contract`): rank ``r``; every strategy but FSDP (PEFT tells A
from B partly by parameter dimensions, which FSDP1 flattens); every precision; the export is
plain PEFT LoRA (``loraplus_lr_ratio`` is dropped from ``adapter_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from app.adapters.contract import ALL_STRATEGIES, MethodSpec
from app.adapters.peft_family import LoraFamilyConfig
from app.errors import ConfigError, is_positive_number

__all__ = ["LoraPlusConfig"]


@dataclass
class LoraPlusConfig(LoraFamilyConfig):
    """``peft.LoraConfig`` plus LoRA+'s learning-rate ratio.

    Args:
        loraplus_lr_ratio: ``lr_B / lr_A``; the optimizer's ``lr`` is A's rate (the paper
            recommends 16 for most tasks, PEFT's helper documents the same).
    """

    loraplus_lr_ratio: float = field(
        default=16.0,
        metadata={"help": "LoRA+: B factors get this multiple of the optimizer's lr (> 0)."},
    )

    _own_fields: ClassVar[tuple[str, ...]] = ("loraplus_lr_ratio",)
    spec: ClassVar[MethodSpec] = MethodSpec(
        name="LoRA+", rank_field="adapter.r", strategies=ALL_STRATEGIES - {"fsdp"},
        strategy_owner="model.init_args.adapter.init_args.loraplus_lr_ratio (LoRA+)",
        strategy_reason="PEFT's create_loraplus_optimizer tells A from B partly by parameter "
                        "dimensions, which FSDP flattens; use FSDP2 "
                        "(configs/strategy/fsdp2.yaml) or trainer.strategy=ddp "
                        "(configs/strategy/ddp.yaml)")

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.loraplus_lr_ratio
        if not is_positive_number(ratio):
            raise ConfigError("model.init_args.adapter.init_args.loraplus_lr_ratio must be a "
                              f"finite number > 0, got {ratio!r}")

    def build_optimizer(self, model: torch.nn.Module, factory: Any,
                        groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """PEFT's LoRA+ groups over ``model``; ``factory``'s own ``lr`` / ``weight_decay``
        are A's rate and every group's decay (read from a one-parameter probe)."""
        from peft.optimizers import create_loraplus_optimizer

        probe = factory([torch.nn.Parameter(torch.zeros(1))]).defaults

        def build(param_groups: Any, **kwargs: Any) -> torch.optim.Optimizer:
            return factory(param_groups, **kwargs)

        optimizer = create_loraplus_optimizer(
            model, build, lr=probe["lr"], loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=probe.get("weight_decay", 0.0))
        head_lr = {id(p): g["lr"] for g in groups if "lr" in g for _, p in g["params"]}
        return _with_head_lr(optimizer, factory, head_lr) if head_lr else optimizer


def _with_head_lr(optimizer: torch.optim.Optimizer, factory: Any,
                  head_lr: dict[int, float]) -> torch.optim.Optimizer:
    """The same groups (built, never stepped) with the task head's parameters moved into
    groups of their own at the module's ``head_lr``; their weight decay is kept."""
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        rest = [p for p in group["params"] if id(p) not in head_lr]
        head = [p for p in group["params"] if id(p) in head_lr]
        groups += [{**options, "params": rest}] if rest else []
        groups += [{**options, "params": head, "lr": head_lr[id(head[0])]}] if head else []
    return factory(groups)
