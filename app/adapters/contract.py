r"""The method contract: what every fine-tuning method declares, once, and everything else reads.

A *method* (LoRA, StelLA, GaLore, full fine-tuning, ...) is a :class:`Method`: an object that
applies itself to a base model, exports the trained result, builds its optimizer, and carries
a :class:`MethodSpec` (static facts) and an optional :class:`Constraint` (which parameters live
on which manifold). The task modules, the start-up checks (:mod:`app.adapters.checks`), the
geometry callbacks, the comparison tool and the tests read these declarations; nothing else
knows a method by name.

Where each kind of method declares itself:

- our own adapters (StelLA): an :class:`AdapterConfig` subclass, itself the :class:`Method`
  (``spec`` class attribute, ``constraint``, ``apply``, ``export``);
- the PEFT LoRA family (LoRA, rsLoRA, DoRA, PiSSA; our Asymmetric / ALLoRA / Manifold-LoRA /
  Riemannian LoRA subclasses of ``peft.LoraConfig``): the config carries ``spec`` (and
  ``constraint()`` / ``initialize(peft_model)`` where it has them); PEFT does the rest through
  :class:`app.adapters.peft_family.PeftMethod`. A plain ``peft.LoraConfig`` gets
  :data:`app.adapters.peft_family.LORA_SPEC`;
- optimizer-side methods (GaLore, GaRare): a ``spec`` class attribute on the optimizer class;
  with ``adapter: null`` they and full fine-tuning (:data:`app.adapters.full.FULL_SPEC`) are
  :class:`app.adapters.full.FullWeights`.

:func:`app.adapters.resolve_method` turns ``(adapter, optimizer)`` from the YAML into the
:class:`Method`. Adding a method: its file (config + whatever it needs), its fragment in
``configs/methods/``, its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

__all__ = [
    "ALL_STRATEGIES",
    "FP32_MASTER_PRECISIONS",
    "ROWWISE",
    "ROWWISE_REASON",
    "UNSHARDED",
    "AdapterConfig",
    "Constraint",
    "Method",
    "MethodSpec",
    "strategy_kind",
]

#: Kinds of Lightning strategy (:func:`strategy_kind`); ``fsdp2`` is
#: :class:`app.fsdp2.AdapterFSDP2Strategy` (factors sharded along their long dimension),
#: ``model_parallel`` a plain ``ModelParallelStrategy``.
StrategyKind = Literal["single", "ddp", "fsdp", "fsdp2", "model_parallel", "deepspeed", "other"]
#: Every strategy kind (``model_parallel`` is refused for every method by the task modules,
#: see :func:`app.adapters.checks.check_strategy`).
ALL_STRATEGIES: frozenset[str] = frozenset(
    {"single", "ddp", "fsdp", "fsdp2", "model_parallel", "deepspeed", "other"})
#: One device or DDP: every rank holds whole, identical parameters.
UNSHARDED: frozenset[str] = frozenset({"single", "ddp"})
#: Also FSDP2 with factors sharded along their long dimension: methods that work on local rows
#: with ``r x r`` all-reduces (:mod:`app.manifolds.sharded`).
ROWWISE: frozenset[str] = UNSHARDED | {"fsdp2"}
#: Why methods that update factors by rows refuse the other strategies (message text).
ROWWISE_REASON = ("it updates factors by rows and this strategy flattens or splits them "
                  "arbitrarily; use FSDP2 (configs/strategy/fsdp2.yaml) or trainer.strategy=ddp "
                  "(or a single device)")
#: Precisions whose parameters (the master weights) are fp32 or fp64.
FP32_MASTER_PRECISIONS: tuple[str, ...] = ("32-true", "32", "64-true", "64", "bf16-mixed")


def strategy_kind(strategy: object) -> str:
    """The :data:`StrategyKind` of a Lightning strategy object."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    from app.fsdp2 import AdapterFSDP2Strategy

    for cls, kind in ((DeepSpeedStrategy, "deepspeed"), (FSDPStrategy, "fsdp"),
                      (AdapterFSDP2Strategy, "fsdp2"),
                      (ModelParallelStrategy, "model_parallel"), (DDPStrategy, "ddp"),
                      (SingleDeviceStrategy, "single")):
        if isinstance(strategy, cls):  # subclasses first (DeepSpeed of DDP, FSDP2 of MP)
            return kind
    return "other"


@dataclass(frozen=True)
class Constraint:
    """Parameters a method keeps on a manifold.

    Attributes:
        factors: Parameter-name substrings selecting the constrained 2-D factors (taken in
            tall ``n x r`` form).
        manifold: ``"stiefel"`` (``X^T X = I``) or ``"sphere"`` (unit-norm columns).
        callback: Class path of the callback that keeps them there (``None``: they are
            frozen and stay where the init put them).
        exact: On the manifold to rounding after every step (retraction, frozen); ``False``:
            only asymptotically (landing), the drift is the number to watch.
        partners: For each ``factors`` entry, the name part of the other factor of the same
            layer (``lora_B`` -> ``lora_A``), for callbacks that also touch it; may be empty.
    """

    factors: tuple[str, ...]
    manifold: Literal["stiefel", "sphere"]
    callback: str | None = None
    exact: bool = True
    partners: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodSpec:
    """The static facts of a method, declared once (a class attribute ``spec``).

    Attributes:
        name: Short name used in messages.
        rank_field: Where the rank is set, relative to ``model.init_args``: ``"adapter.r"``,
            ``"optimizer.rank"``; ``None`` for a method without one (full fine-tuning).
        strategies: Strategy kinds it trains under (:func:`strategy_kind`).
        strategy_owner: Who refuses the others, as named in the message (a callback, an option).
        strategy_reason: Why, and what to use instead (the rest of the message).
        kind_reasons: ``(kind, text)`` pairs overriding the message for one strategy kind;
            the text follows the strategy's name verbatim (``" yet: ..."``).
        precisions: ``trainer.precision`` values it supports; ``None``: all.
        precision_owner: Who refuses the others.
        no_decay: Parameter-name substrings kept out of weight decay (constrained factors).
        state_markers: ``state_dict`` substrings of adapter tensors a checkpoint keeps even
            when frozen (our own layers; PEFT layers are found by PEFT's prefix).
        callbacks: Class paths of callbacks the method needs; a fit whose
            ``trainer.callbacks`` lacks one is warned at start-up, naming the class to add.
        full_weights: It optimises the full weights (GaLore, GaRare): ``adapter`` must be null.
    """

    name: str
    rank_field: str | None = "adapter.r"
    strategies: frozenset[str] = ALL_STRATEGIES
    strategy_owner: str = ""
    strategy_reason: str = ""
    kind_reasons: tuple[tuple[str, str], ...] = ()
    precisions: tuple[str, ...] | None = None
    precision_owner: str = ""
    no_decay: tuple[str, ...] = ()
    state_markers: tuple[str, ...] = ()
    callbacks: tuple[str, ...] = ()
    full_weights: bool = False


class Method:
    """What a task module needs from a method (the defaults suit most; override what differs).

    Attributes:
        spec: The method's :class:`MethodSpec`.
    """

    spec: ClassVar[MethodSpec]

    def constraint(self) -> Constraint | None:
        """The constrained factors, or ``None`` (instance-level: it may depend on options)."""
        return None

    def target_patterns(self) -> list[str] | str | None:
        """The target module names or regex, checked before the model is loaded."""
        return None

    def apply(self, model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
        """Freeze the base, add the trainable part, keep ``head_modules`` trainable."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, folder: Path, base_path: str) -> None:
        """Write the trained part to ``folder`` for use outside this project."""
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module, factory: Any,
                        groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (named parameter groups, see
        :func:`app.modules.core.parameter_groups`); ``factory`` is the YAML's optimizer."""
        return factory(groups)


@dataclass
class AdapterConfig(Method):
    """Base of the project's own (non-PEFT) adapter configs: typed fields, ``apply``, ``export``.

    A subclass is both the YAML config (``class_path``) and the :class:`Method`.
    """
