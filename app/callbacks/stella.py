r"""StelLA's Riemannian step around any torch optimizer (Li et al., NeurIPS 2025, Alg. 1).

Once per real optimizer step (after gradient accumulation, after Lightning's gradient
clipping), for every Stiefel factor ``X`` in tall ``n x r`` form (``U`` as stored, ``V`` as
``stella_V.weight^T``):

1. before ``optimizer.step()``: replace the Euclidean gradient ``G`` by the Riemannian
   gradient of the canonical metric, :math:`G - X G^T X`, and remember :math:`X_{old}`;
2. the optimizer steps (AdamW in the paper; ``S`` keeps its Euclidean gradient);
3. after the step: :math:`D = X_{new} - X_{old}`; with gradient scaling
   :math:`D \leftarrow D / \sqrt{n / c}` when ``n`` differs from the hidden size ``c``
   (the public code's ``stella_grad_scaling``); :math:`\xi = P_{X_{old}}(D)`;
   :math:`X \leftarrow R_{X_{old}}(\xi)` (polar or exponential map).

Hook points: torch optimizer step hooks (the closure-aware
:class:`app.callbacks.step_hooks.OptimizerStepHooks`), not ``on_before_optimizer_step``,
because Lightning clips gradients after that hook. Lightning's automatic optimization calls
``optimizer.step(closure=...)`` and the closure (forward, backward, ``on_before_optimizer_step``,
clipping) runs *inside* ``step``, after torch's step pre-hooks; a plain pre-hook would see the
previous step's gradients (``None`` on the first step). So the pre-hook wraps the closure and the
pre-step work runs right after it returns: once per real step, on the final clipped gradient.
All math runs in the factors' dtype (fp32 master weights) under ``no_grad``, in Gram form
(:mod:`app.manifolds.fused`): one pass over the factors for the ``r x r`` products, one batched
``r x r`` computation, one pass writing the retracted factors straight into the parameters; the
snapshot lives in buffers allocated once, so nothing ``n x r`` is stacked or copied per step.

The start-up checks shared with the other geometry callbacks live in
:mod:`app.callbacks.factors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from app.adapters.stella import StellaConfig
from app.callbacks.factors import (
    check_factor_dtypes,
    check_fit_setup,
    check_no_weight_decay,
    hidden_size_of,
    module_method,
    optimizers_holding,
    reducer_for,
    select_factors,
    tall,
    tall_local,
)
from app.callbacks.state import StatefulCallback
from app.callbacks.step_hooks import OptimizerStepHooks
from app.errors import ConfigError
from app.manifolds import fused


class StellaCallback(StatefulCallback):
    r"""Keeps StelLA's ``U`` and ``V`` on the Stiefel manifold around any optimizer step.

    Args:
        patterns: Substrings selecting the Stiefel factors by parameter name (2-D, trainable);
            ``None`` (default): the factors :meth:`app.adapters.stella.StellaConfig.constraint`
            declares.
        retraction: ``"polar"`` (:math:`Y (Y^T Y)^{-1/2}` via an ``r x r`` eigendecomposition,
            the paper's choice) or ``"exp"`` (exponential map of the embedded metric).
        gradient_scaling: Divide the step ``D`` of a factor with ``n != c`` rows by
            :math:`\sqrt{n / c}`, ``c`` the hidden size (StelLA's public code).
        hidden_size: ``c``; ``None`` reads ``hidden_size`` from the model's config.
        polar_solver: How the polar retraction forms :math:`(Y^T Y)^{-1/2}`: ``"eigh"``
            (default; float64 binomial series at small steps, else an ``r x r``
            eigendecomposition) or ``"newton_schulz"`` (float32 matmuls only, five
            Newton-Schulz steps with the proven bound ``||Y^T Y - I||_2 <= 0.5 ** 32`` inside
            ``||Y^T Y - I||_F < 0.5``, the eigendecomposition outside it; no eigensolver on
            the GPU at normal step sizes: :mod:`app.manifolds.newton_schulz`). Both give the
            same polar factor to float32 rounding; the products run in IEEE float32 even
            when the user turned TF32 on. Ignored for ``retraction: exp``.
    """

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        retraction: Literal["polar", "exp"] = "polar",
        gradient_scaling: bool = True,
        hidden_size: int | None = None,
        polar_solver: Literal["eigh", "newton_schulz"] = "eigh",
    ) -> None:
        if isinstance(patterns, str) or (patterns is not None and not patterns):
            raise ConfigError("StellaCallback patterns must be a non-empty list of substrings")
        if retraction not in ("polar", "exp"):
            raise ConfigError(f"StellaCallback retraction must be 'polar' or 'exp', "
                              f"got {retraction!r}")
        if polar_solver not in ("eigh", "newton_schulz"):
            raise ConfigError(f"StellaCallback polar_solver must be 'eigh' or 'newton_schulz', "
                              f"got {polar_solver!r}")
        if hidden_size is not None and hidden_size < 1:
            raise ConfigError(f"StellaCallback hidden_size must be positive, got {hidden_size}")
        self.patterns = None if patterns is None else tuple(patterns)
        self.retraction = retraction
        self.gradient_scaling = gradient_scaling
        self.hidden_size = hidden_size
        self.polar_solver = polar_solver
        #: Completed Riemannian steps (checkpointed).
        self.num_steps = 0
        self._factors: list[tuple[str, torch.nn.Parameter]] = []
        self._c: int | None = None
        self._active: list[torch.nn.Parameter] = []
        self._snapshot: list[Tensor] | None = None
        self._buffers: dict[int, Tensor] = {}
        self._reduce: Any = None
        self._hooks = OptimizerStepHooks(self._pre_step, self._post_step)

    # -- start-up checks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_fit_setup(trainer, pl_module, "StellaCallback", StellaConfig)

    def _select(self, pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        method = module_method(pl_module)
        declared = (method.constraint() if method is not None else None) or \
            StellaConfig().constraint()
        patterns = self.patterns or declared.factors
        return select_factors(pl_module, patterns, "StellaCallback", "StellaCallback patterns")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._factors = self._select(pl_module)
        check_factor_dtypes(self._factors, "StellaCallback")
        check_no_weight_decay(trainer, self._factors, "StellaCallback")
        self._c = None
        if self.gradient_scaling:
            self._c = self.hidden_size or hidden_size_of(pl_module)
            if self._c is None:
                raise ConfigError("StellaCallback gradient_scaling needs the hidden size: the "
                                  "model config has no hidden_size; set hidden_size or "
                                  "gradient_scaling: false")

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = [p for _, p in self._factors]
        self._reduce = reducer_for(params)  # FSDP2: r x r all-reduces over the shard group
        self._hooks.attach(optimizers_holding(trainer, params, "StellaCallback"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks.detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._hooks.detach()
        self._snapshot = None
        self._buffers = {}

    def constrained_factors(self, pl_module: L.LightningModule) -> list[tuple[str, Tensor, str]]:
        """``(name, tall view n x r, "stiefel")`` for every factor (drift-monitor protocol)."""
        factors = self._factors or self._select(pl_module)
        return [(n, tall(p.detach()), "stiefel") for n, p in factors]

    @torch.no_grad()
    def _pre_step(self) -> None:
        self._active = [p for _, p in self._factors if p.grad is not None]
        xs = [tall_local(p.detach()) for p in self._active]  # local rows under FSDP2
        fused.riemannian_grad_(xs, [tall_local(p.grad) for p in self._active], self._reduce)
        # persistent snapshot buffers (same layout as the parameter): no allocation per step
        self._snapshot = []
        for p, x in zip(self._active, xs):
            buf = self._buffers.get(id(p))
            if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
                buf = self._buffers[id(p)] = torch.empty_like(x)
            buf.copy_(x)
            self._snapshot.append(buf)

    @torch.no_grad()
    def _post_step(self) -> None:
        if self._snapshot is None:
            return
        news = [tall_local(p.data) for p in self._active]
        fused.retract_fused(self._snapshot, news, [self._scale(p) for p in self._active],
                            self.retraction, outs=news, reduce=self._reduce,
                            solver=self.polar_solver)
        self._snapshot, self._active = None, []
        self.num_steps += 1

    def _scale(self, p: Tensor) -> float:
        """StelLA's gradient scaling ``1 / sqrt(n / c)`` for a factor with ``n != c`` rows."""
        n = max(p.shape)
        if self._c is None or n == self._c:
            return 1.0
        return 1.0 / math.sqrt(n / self._c)

    # -- checkpointing --------------------------------------------------------------------
    def state_options(self) -> dict[str, Any]:
        return {"patterns": self.patterns, "retraction": self.retraction,
                "gradient_scaling": self.gradient_scaling, "hidden_size": self.hidden_size}
        # polar_solver is left out: both solvers give the same factors to rounding, so a run
        # may resume with the other one (and older checkpoints keep their state key)

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_steps = int(state_dict.get("num_steps", 0))
