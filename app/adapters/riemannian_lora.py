r"""Riemannian-preconditioned LoRA: LoRA's gradients rescaled by the fixed-rank manifold's metric.

F. Zhang, M. Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
ICML 2024 (arXiv:2402.02347; public code: github.com/pilancilab/Riemannian_Preconditioned_LoRA).
For every LoRA layer, ``B`` (``out x r``) and ``A`` (``r x in``), the Euclidean gradients are
replaced before the optimizer sees them by

.. math::

    \nabla_A \leftarrow (B^T B + \delta I_r)^{-1} \nabla_A, \qquad
    \nabla_B \leftarrow \nabla_B (A A^T + \delta I_r)^{-1},

the scaled gradient of the quotient geometry of ``B A`` (the paper's Riemannian metric of
fixed-rank matrices). With SGD this is the paper's scaled GD; with AdamW, its "scaled AdamW"
(the preconditioned gradients are what AdamW's moments see). Both solves are ``r x r``: one
batched ``torch.linalg.solve`` per group of same-shaped layers, fp32 under ``no_grad``.
With LoRA's ``B = 0`` at init, ``B^T B + delta I = delta I`` scales A's gradient by
``1 / delta``, but that gradient is zero (it is ``s B^T G``), so the first step moves ``B``
only, as the paper notes.

This file is the whole method (the contract of :mod:`app.adapters.contract`):
:class:`RiemannianLoraConfig` is the adapter (PEFT LoRA plus ``delta``; PEFT builds, merges
and exports it as plain LoRA) and declares that it needs :class:`RiemannianPreconditioner`
(its fragment lists it; a fit without it is warned at start-up). The preconditioner runs where
gradients are final (after accumulation and clipping, right after Lightning's closure:
:class:`app.callbacks.step_hooks.OptimizerStepHooks`), once per real optimizer step, and is
deterministic, so every DDP rank computes the same update. Under FSDP2 (factors sharded along
their long dimension, :class:`app.fsdp2.AdapterFSDP2Strategy`) ``B^T B`` and ``A A^T`` are sums
over the local rows / columns: one all-reduce of the ``k x r x r`` Gram matrices per shape
group, then the solves act on the local rows of ``grad_B`` and columns of ``grad_A``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from app.adapters.contract import ROWWISE, ROWWISE_REASON, MethodSpec
from app.adapters.lora import lora_layers
from app.adapters.peft_family import LoraFamilyConfig
from app.callbacks.factors import check_fit_setup, reducer_for
from app.callbacks.state import StatefulCallback
from app.callbacks.step_hooks import OptimizerStepHooks
from app.errors import ConfigError, is_positive_number
from app.fsdp2 import local

__all__ = ["RiemannianLoraConfig", "RiemannianPreconditioner", "precondition"]

_OPTION = "model.init_args.adapter.init_args"
_CALLBACK = "app.adapters.riemannian_lora.RiemannianPreconditioner"


@torch.no_grad()
def precondition(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor, delta: float,
                 reduce: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    r"""Batched :math:`((B^T B + \delta I)^{-1} G_A,\ G_B (A A^T + \delta I)^{-1})`.

    Args:
        a: ``k x r x in`` factors ``A`` (or this rank's columns of them).
        b: ``k x out x r`` factors ``B`` (or this rank's rows).
        grad_a: Gradients of ``a``.
        grad_b: Gradients of ``b``.
        delta: The damping ``delta > 0``.
        reduce: In-place sum over the ranks of the ``2k x r x r`` Gram matrices, for
            sharded factors (``None``: whole factors).

    Returns:
        The preconditioned gradients, in float32 (float64 for float64 inputs).
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b, grad_a, grad_b = (t.to(dtype) for t in (a, b, grad_a, grad_b))
    eye = delta * torch.eye(a.shape[-2], dtype=dtype, device=a.device)
    grams = torch.cat([b.transpose(-1, -2) @ b, a @ a.transpose(-1, -2)])
    if reduce is not None:
        reduce(grams)
    btb, aat = grams.split(a.shape[0])
    new_a = torch.linalg.solve(btb + eye, grad_a)
    # G_B M^{-1} with M = A A^T symmetric: solve M X = G_B^T, then transpose.
    new_b = torch.linalg.solve(aat + eye, grad_b.transpose(-1, -2)).transpose(-1, -2)
    return new_a, new_b


@dataclass
class RiemannianLoraConfig(LoraFamilyConfig):
    """``peft.LoraConfig`` plus the preconditioner's damping ``delta``.

    All ``LoraConfig`` options apply except DoRA (its magnitude vector is not part of the
    low-rank product the metric is defined for). The exported ``adapter_config.json`` is plain
    LoRA (``delta`` is dropped).

    Args:
        delta: Damping added to ``B^T B`` and ``A A^T`` before the solves (the paper's
            default, 1e-6).
    """

    delta: float = field(
        default=1e-6,
        metadata={"help": "Damping delta > 0 of (B^T B + delta I)^-1 and (A A^T + delta I)^-1 "
                          "(the paper's 1e-6)."},
    )

    _own_fields: ClassVar[tuple[str, ...]] = ("delta",)
    spec: ClassVar[MethodSpec] = MethodSpec(
        name="Riemannian LoRA", rank_field="adapter.r", strategies=ROWWISE,
        strategy_owner="RiemannianPreconditioner", strategy_reason=ROWWISE_REASON,
        callbacks=(_CALLBACK,))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_positive_number(self.delta):
            raise ConfigError(f"{_OPTION}.delta must be a finite number > 0, got {self.delta!r}")
        if self.use_dora:
            raise ConfigError(f"{_OPTION}.use_dora: Riemannian preconditioning is defined for "
                              "the plain low-rank product B A; set use_dora: false")


class RiemannianPreconditioner(StatefulCallback):
    """Precondition every LoRA layer's ``A`` and ``B`` gradients once per optimizer step.

    Reads ``delta`` from the module's :class:`RiemannianLoraConfig`. Counts its steps in
    ``num_steps`` (checkpointed).
    """

    def __init__(self) -> None:
        self.delta: float | None = None
        self.num_steps = 0
        self._groups: list[tuple[list[Tensor], list[Tensor]]] = []
        self._reduce: Callable[[Tensor], None] | None = None
        self._hooks = OptimizerStepHooks(self._pre_step, None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        adapter = check_fit_setup(trainer, pl_module, "RiemannianPreconditioner",
                                  RiemannianLoraConfig)
        if adapter is not None:
            self.delta = float(adapter.delta)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shapes: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for name, layer, key in lora_layers(pl_module.model):
            a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
            if not (a.requires_grad and b.requires_grad):
                raise ConfigError(f"RiemannianPreconditioner: LoRA layer '{name}' has a frozen "
                                  "factor; both A and B must be trained")
            group = shapes[(tuple(a.shape), tuple(b.shape), a.dtype, a.device)]
            group[0].append(a)
            group[1].append(b)
        if not shapes:
            raise ConfigError("RiemannianPreconditioner: the model has no LoRA layer")
        self._groups = list(shapes.values())
        self._reduce = reducer_for([p for a, b in self._groups for p in (*a, *b)])
        self._hooks.attach(trainer.optimizers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks.detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._hooks.detach()

    @torch.no_grad()
    def _pre_step(self) -> None:
        assert self.delta is not None
        for a_params, b_params in self._groups:
            if any(p.grad is None for p in (*a_params, *b_params)):
                continue  # a layer outside this step's graph: nothing to precondition
            new_a, new_b = precondition(
                torch.stack([local(p.detach()) for p in a_params]),
                torch.stack([local(p.detach()) for p in b_params]),
                torch.stack([local(p.grad) for p in a_params]),
                torch.stack([local(p.grad) for p in b_params]), self.delta, self._reduce)
            for p, g in zip(a_params, new_a.unbind(0)):
                local(p.grad).copy_(g)
            for p, g in zip(b_params, new_b.unbind(0)):
                local(p.grad).copy_(g)
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_steps = int(state_dict.get("num_steps", 0))
