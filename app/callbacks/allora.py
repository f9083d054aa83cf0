r"""ALLoRA's adaptive learning rate, applied to the optimizer's update after every real step.

Huang and Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024
(arXiv:2410.09692). No public code exists; this is our reading of the paper.
Every LoRA factor's update is scaled by

.. math::
    c(\theta) = \frac{1}{\sqrt{\|\theta\|^2 + 1/\eta^2}}, \qquad
    \theta \leftarrow \theta_{old} + c(\theta_{old})\,(\theta_{new} - \theta_{old}),

where ``theta_new`` is what the optimizer proposed (its whole step, decoupled weight decay
included) and ``c`` is evaluated at the parameters before the step. ``c = eta`` at
``theta = 0`` (B escapes zero eta times faster), ``c ~ 1/||theta||`` once ``||theta|| >> 1/eta``.

Why the update and not the gradient: Adam-type optimizers divide by the running RMS of the
gradient, which cancels any per-tensor or per-row constant put on the gradient; scaling the
proposed update keeps ALLoRA's effect under AdamW (tested: the trajectory differs from LoRA).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from app.adapters.checks import check_trainer
from app.adapters.lora import AlloraConfig, lora_layers
from app.callbacks.factors import reducer_for
from app.callbacks.state import StatefulCallback
from app.callbacks.step_hooks import OptimizerStepHooks
from app.errors import ConfigError, is_positive_number
from app.fsdp2 import local

__all__ = ["AlloraUpdateScaling", "allora_coefficient"]


def allora_coefficient(x: Tensor, eta: float, dim: int | None) -> Tensor:
    r"""``c = 1 / sqrt(||x||^2 + 1/eta^2)`` over ``dim`` (``None``: the whole trailing matrix).

    Args:
        x: A batch of factors ``k x m x n`` (float32).
        eta: ALLoRA's ``eta > 0``.
        dim: ``1`` for one norm per column (``k x 1 x n``), ``2`` for one per row
            (``k x m x 1``), ``None`` for one per matrix (``k x 1 x 1``).
    """
    dims = (1, 2) if dim is None else (dim,)
    return torch.rsqrt(x.square().sum(dim=dims, keepdim=True) + 1.0 / eta**2)


@dataclass
class _Group:
    """Same-shaped factors of one role, processed as one ``k x m x n`` batch."""

    params: list[Tensor]
    dim: int | None
    old: Tensor | None = None
    coef: Tensor | None = None


class AlloraUpdateScaling(StatefulCallback):
    r"""Scale each LoRA factor's optimizer update by ALLoRA's ``c(theta_old)``.

    Granularity (decision; ``granularity`` option):

    * ``"row"`` (default): "per parameter" read as per input / output feature. ``B`` (``out x
      r``): one ``c`` per row ``b_i`` (the r weights producing output ``i``); ``A`` (``r x in``):
      one per column ``a_j`` (the r weights reading input ``j``). Each is an ``r``-vector,
      so ``eta`` means the same for both factors and for every layer width.
    * ``"tensor"``: one ``c`` per factor matrix (Frobenius norm).

    Only trainable ``lora_A`` / ``lora_B`` weights are scaled; the task head and any other
    trainable parameter keep the optimizer's plain update. The pre-step snapshot is taken in a
    torch optimizer step pre-hook, the scaling in a post-hook (:class:`OptimizerStepHooks`), so it
    runs once per real optimizer step (after gradient accumulation); the parameters do not change
    between the two, so it is independent of where clipping happens. Math in fp32 under
    ``no_grad``, batched over same-shaped factors; deterministic, so every DDP rank applies the
    same update. Under FSDP2 (``configs/strategy/fsdp2.yaml``) ``B`` is sharded by rows and
    ``A`` by columns, so the ``"row"`` norms are local; ``"tensor"`` all-reduces one sum per
    factor. FSDP1's flat shards are refused.

    Logged after each step: ``allora/coef_A_mean``, ``allora/coef_B_mean`` (mean of ``c``).

    Args:
        eta: ``eta > 0``; ``None`` (default) takes ``eta`` from the module's
            :class:`~app.adapters.lora.AlloraConfig`. Setting it to a different value than the
            config's is an error (one source of truth).
        granularity: ``"row"`` or ``"tensor"``, see above.

    Raises:
        ConfigError: At ``setup``, if the module's ``adapter`` is not an ``AlloraConfig`` or
            ``eta`` is invalid; at ``on_fit_start`` (before any step) if a LoRA layer has
            dropout or scaling != 1, has no trainable factor, or is sharded.
    """

    def __init__(self, eta: float | None = None,
                 granularity: Literal["row", "tensor"] = "row") -> None:
        if granularity not in ("row", "tensor"):
            raise ConfigError(f"AlloraUpdateScaling granularity must be 'row' or 'tensor', got "
                              f"{granularity!r}")
        if eta is not None and not is_positive_number(eta):
            raise ConfigError(f"AlloraUpdateScaling eta must be a finite number > 0, got {eta}")
        self.eta = eta
        self.granularity = granularity
        self.resolved_eta: float | None = None
        self._groups: list[_Group] = []
        self._reduce: Any = None
        self._roles: list[str] = []
        self._hooks = OptimizerStepHooks(self._before_step, self._after_step)
        self._stepped = False
        self.last_coefficient_mean: dict[str, float] = {}
        #: Completed scaled steps (checkpointed).
        self.num_steps = 0

    # -- start-up checks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # FSDP1 hands the optimizer flat 1-D shards (not DTensors): row norms would be wrong.
        check_trainer(AlloraConfig.spec, trainer)
        adapter = getattr(pl_module, "adapter", None)
        if not isinstance(adapter, AlloraConfig):
            raise ConfigError(
                "AlloraUpdateScaling needs model.init_args.adapter to be "
                "app.adapters.lora.AlloraConfig (LoRA without dropout, scaling 1); got "
                f"{type(adapter).__name__ if adapter is not None else 'null (full fine-tuning)'}")
        if self.eta is not None and self.eta != adapter.eta:
            raise ConfigError(
                f"AlloraUpdateScaling eta={self.eta} differs from the adapter's eta={adapter.eta}; "
                "set it in one place (model.init_args.adapter.init_args.eta)")
        self.resolved_eta = float(adapter.eta)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        model = pl_module if model is None else model
        self.attach(model, trainer.optimizers, self.resolved_eta or self.eta)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks.detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._hooks.detach()

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, optimizers: Any, eta: float | None) -> None:
        """Check the LoRA layers of ``model`` and hook the scaling into ``optimizers``.

        Usable without a Trainer (benchmarks, tests): ``attach(peft_model, [optimizer], eta)``.
        """
        if not is_positive_number(eta):
            raise ConfigError(f"AlloraUpdateScaling needs a finite eta > 0, got {eta}")
        self.resolved_eta = float(eta)
        shapes: dict[tuple, list[Tensor]] = defaultdict(list)
        count = 0
        for name, layer, adapter in lora_layers(model):
            count += 1
            scaling = layer.scaling[adapter]
            dropout = layer.lora_dropout[adapter]
            if scaling != 1 or not (isinstance(dropout, torch.nn.Identity)
                                    or getattr(dropout, "p", 0) == 0):
                raise ConfigError(
                    f"ALLoRA: LoRA layer '{name}' has scaling {scaling:g} and dropout "
                    f"{getattr(dropout, 'p', 0)}; ALLoRA needs scaling 1 and no dropout (use "
                    "app.adapters.lora.AlloraConfig)")
            for role, factor, dim in (("A", layer.lora_A[adapter], 1),
                                      ("B", layer.lora_B[adapter], 2)):
                weight = factor.weight
                if not weight.requires_grad:
                    continue
                key = (role, tuple(weight.shape), weight.dtype, weight.device,
                       dim if self.granularity == "row" else None)
                shapes[key].append(weight)
        if count == 0:
            raise ConfigError("ALLoRA: the model has no LoRA layer (model.init_args.adapter)")
        self._groups = [_Group(params, key[4]) for key, params in shapes.items()]
        self._reduce = reducer_for([p for g in self._groups for p in g.params])
        self._roles = [key[0] for key in shapes]
        if not self._groups:
            raise ConfigError("ALLoRA: no trainable lora_A / lora_B factor to scale")
        self._hooks.attach(optimizers)

    @torch.no_grad()
    def _before_step(self) -> None:
        eta = self.resolved_eta
        assert eta is not None
        for group in self._groups:
            # FSDP2: local shards; B is sharded by rows and A by columns, so "row" norms are
            # local and a "tensor" norm needs one all-reduce of the per-factor sums
            old = torch.stack([local(p.detach()) for p in group.params]).float()
            group.old = old
            if group.dim is None and self._reduce is not None:
                sq = old.square().sum(dim=(1, 2), keepdim=True)
                self._reduce(sq)
                group.coef = torch.rsqrt(sq + 1.0 / eta**2)
            else:
                group.coef = allora_coefficient(old, eta, group.dim)

    @torch.no_grad()
    def _after_step(self) -> None:
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for role, group in zip(self._roles, self._groups):
            assert group.old is not None and group.coef is not None
            new = torch.stack([local(p.detach()) for p in group.params]).float()
            scaled = group.old + group.coef * (new - group.old)
            for p, value in zip(group.params, scaled.unbind(0)):
                local(p.data).copy_(value)
            sums[role][0] += float(group.coef.sum())
            sums[role][1] += group.coef.numel()
            group.old = group.coef = None
        self.last_coefficient_mean = {role: s / n for role, (s, n) in sums.items()}
        self._stepped = True
        self.num_steps += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            for role, value in self.last_coefficient_mean.items():
                pl_module.log(f"allora/coef_{role}_mean", value, on_step=True, on_epoch=False)

    # -- checkpointing ---------------------------------------------------------------------
    def state_options(self) -> dict[str, Any]:
        return {"eta": self.eta, "granularity": self.granularity}

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_steps = int(state_dict.get("num_steps", 0))
