r"""Manifold-LoRA's retraction-free landing step for ``B`` around any torch optimizer.

"Retraction-free optimization over the Stiefel manifold with application to the LoRA
fine-tuning" (Manifold-LoRA); landing: P. Ablin, G. Peyré, "Fast and accurate optimization
on the orthogonal manifold without retraction", AISTATS 2022. No public code exists; this is
our reading (METHODS.md), on the same engine as StelLA:

1. before the update (:class:`app.callbacks.step_hooks.OptimizerStepHooks`: right after
   Lightning's closure, i.e. after backward and gradient clipping): remember
   :math:`B_{old}` (and ``A`` with ``balance_a_lr``);
2. the optimizer proposes :math:`D = B_{new} - B_{old}` from the Euclidean gradient;
3. after the step (torch step post-hook), Stiefel:

   .. math::

       B \leftarrow B_{old} + P_{B_{old}}(D) - \mu\, B_{old} (B_{old}^T B_{old} - I)

   sphere, per column ``b``: :math:`b \leftarrow b + (d - (b^T d) b) - \mu\, b (\|b\|^2 - 1)`.

Only matmuls (no SVD), one batched call per shape group, fp32 under ``no_grad``. ``B`` is on
the manifold only asymptotically: the penalty contracts the drift by ``|1 - 2 mu|`` per step
(1/3 for ``mu = 1/3``) while each tangent step adds about :math:`\|P(D)\|_F^2`; the drift is
what :class:`app.callbacks.drift_monitor.OrthogonalityDrift` shows.

``balance_a_lr`` (our formula; the paper adapts A's step size to balance the factors): for
:math:`f(B, A) = \ell(W_0 + s B A)` with :math:`\ell` L-smooth, the block Lipschitz constants
are :math:`L_A = s^2 \|B\|_2^2 L` and :math:`L_B = s^2 \|A\|_2^2 L`. The landing step for
``B`` is tuned for unit-scale ``B`` (``lr`` and ``mu``); ``A`` carries the magnitude, and its
growth makes the pair stiffer (:math:`L_B \propto \|A\|_2^2`). A's proposed step is scaled by

.. math::

    c_A = \min\Bigl(1, \frac{\|B_{old}\|_2}{\|A_{old}\|_2}\Bigr)
        = \min\Bigl(1, \sqrt{L_A / L_B}\Bigr), \qquad A \leftarrow A_{old} + c_A (A_{new} - A_{old})

per layer: unchanged while A is no larger than B (including the escape from ``A = 0``), and
damped by the square root of the Lipschitz imbalance once A dominates. Spectral norms come
from the ``r x r`` Gram matrices (:math:`\|B\|_2^2 = \lambda_{max}(B^T B)`,
:math:`\|A\|_2^2 = \lambda_{max}(A A^T)`). Adam's moments are untouched; only the step is
scaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from app.adapters.manifold_lora import ManifoldLoraConfig
from app.callbacks.factors import (
    check_factor_dtypes,
    check_fit_setup,
    check_no_weight_decay,
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
from app.fsdp2 import local
from app.manifolds import sharded, sphere, stiefel
from app.manifolds.batching import apply_grouped

__all__ = ["LandingCallback", "a_step_scale"]


@torch.no_grad()
def a_step_scale(b: Tensor, a: Tensor) -> Tensor:
    r"""Batched :math:`c_A = \min(1, \|B\|_2 / \|A\|_2)` for ``b`` (k, n, r), ``a`` (k, r, m).

    Returns:
        ``(k,)`` factors in float32 (float64 for float64 inputs); 1 where ``A = 0``.
    """
    dtype = stiefel.compute_dtype(b, a)
    b, a = b.to(dtype), a.to(dtype)
    b_sq = torch.linalg.eigvalsh(b.transpose(-1, -2) @ b)[..., -1].clamp_min(0)
    a_sq = torch.linalg.eigvalsh(a @ a.transpose(-1, -2))[..., -1].clamp_min(0)
    ratio = torch.sqrt(b_sq / a_sq.clamp_min(torch.finfo(dtype).tiny))
    return torch.where(a_sq > b_sq, ratio, torch.ones_like(ratio))


class LandingCallback(StatefulCallback):
    r"""Keeps Manifold-LoRA's ``B`` near its manifold with landing steps (no retraction).

    The manifold and the factor names come from the adapter's declaration
    (:meth:`app.adapters.manifold_lora.ManifoldLoraConfig.constraint`), so the YAML states
    the manifold once, on the adapter.

    Args:
        manifold: ``None`` (default): the adapter's ``manifold``; ``"stiefel"``
            (:math:`B^T B = I`) or ``"sphere"`` (unit-norm columns) must equal it.
        mu: Penalty step :math:`\mu` (the paper fixes 1/3; ``0 < mu < 1`` contracts the
            drift, ``mu = 1/2`` is the fastest near the manifold).
        patterns: Substrings selecting ``B`` by parameter name (tall ``out x r``); ``None``:
            the adapter's constrained factors.
        balance_a_lr: Scale A's step by :math:`c_A = \min(1, \|B\|_2 / \|A\|_2)` (module doc).
        a_patterns: How ``A``'s name is derived from ``B``'s: the first ``patterns`` entry
            found in B's name is replaced by the same-position entry here; ``None``: the
            constraint's ``partners``.
    """

    def __init__(
        self,
        manifold: Literal["stiefel", "sphere"] | None = None,
        mu: float = 1 / 3,
        patterns: Sequence[str] | None = None,
        balance_a_lr: bool = False,
        a_patterns: Sequence[str] | None = None,
    ) -> None:
        if manifold is not None and manifold not in ("stiefel", "sphere"):
            raise ConfigError(f"LandingCallback manifold must be 'stiefel' or 'sphere', "
                              f"got {manifold!r}")
        if not 0.0 < mu < 1.0:
            raise ConfigError(f"LandingCallback mu must be in (0, 1), got {mu}")
        if isinstance(patterns, str) or (patterns is not None and not patterns):
            raise ConfigError("LandingCallback patterns must be a non-empty list of substrings")
        if isinstance(a_patterns, str) or (
                a_patterns is not None and len(a_patterns) != len(patterns or ("",))):
            raise ConfigError("LandingCallback a_patterns must be a list as long as patterns")
        self.manifold = manifold
        self.mu = float(mu)
        self.patterns = None if patterns is None else tuple(patterns)
        self.a_patterns = None if a_patterns is None else tuple(a_patterns)
        self.balance_a_lr = balance_a_lr
        #: Completed landing steps (checkpointed).
        self.num_steps = 0
        self._factors: list[tuple[str, torch.nn.Parameter]] = []
        self._pairs: list[torch.nn.Parameter] = []  # A of each B, when balancing
        self._active: list[int] = []
        self._snapshot: list[Tensor] | None = None
        self._a_snapshot: list[Tensor] | None = None
        self._reduce: Any = None
        self._hooks = OptimizerStepHooks(self._pre_step, self._post_step)
        self._manifold: str | None = manifold  # the adapter's, resolved at fit start
        self._names: list[tuple[str, ...]] = []

    # -- start-up checks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        adapter = check_fit_setup(trainer, pl_module, "LandingCallback", ManifoldLoraConfig,
                                  " (B orthonormal, A = 0)")
        if adapter is not None and self.manifold not in (None, adapter.manifold):
            raise ConfigError(
                f"LandingCallback manifold={self.manifold!r} but the adapter's "
                f"model.init_args.adapter.init_args.manifold={adapter.manifold!r}; "
                "set both to the same value")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._manifold, *self._names = self._declared(pl_module)
        self._factors = self._select(pl_module)
        bad = [(n, tuple(p.shape)) for n, p in self._factors if p.shape[0] < p.shape[1]]
        if bad:
            raise ConfigError(f"LandingCallback: {bad[0][0]} has shape {bad[0][1]}; B must be "
                              "tall (out x r with out >= r); check LandingCallback patterns")
        check_factor_dtypes(self._factors, "LandingCallback")
        check_no_weight_decay(trainer, self._factors, "LandingCallback")
        self._pairs = []
        if self.balance_a_lr:
            params = dict(pl_module.named_parameters())
            for name, _ in self._factors:
                a_name = self._a_name(name)
                if a_name not in params:
                    raise ConfigError(f"LandingCallback balance_a_lr: no parameter {a_name} "
                                      f"pairs with {name}; check a_patterns")
                self._pairs.append(params[a_name])

    def _declared(self, pl_module: L.LightningModule) -> tuple[str, tuple[str, ...],
                                                                tuple[str, ...]]:
        """``(manifold, B patterns, A patterns)``: the options, else the adapter's constraint."""
        method = module_method(pl_module)
        declared = (method.constraint() if method is not None else None) or \
            ManifoldLoraConfig().constraint()
        patterns = self.patterns or declared.factors
        a_patterns = self.a_patterns or declared.partners
        return self.manifold or declared.manifold, patterns, a_patterns

    def manifold_for(self, pl_module: L.LightningModule) -> str:
        """The manifold this callback keeps ``B`` on for ``pl_module``: the adapter's."""
        return self._declared(pl_module)[0]

    def _select(self, pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        _, patterns, _ = self._declared(pl_module)
        return select_factors(pl_module, patterns, "LandingCallback",
                              "LandingCallback patterns")

    def _a_name(self, b_name: str) -> str:
        for pat, a_pat in zip(*self._names):
            if pat in b_name:
                return b_name.replace(pat, a_pat)
        return b_name

    def constrained_factors(self, pl_module: L.LightningModule) -> list[tuple[str, Tensor, str]]:
        """``(name, B (out x r), manifold)`` for every ``B`` (drift-monitor protocol)."""
        factors = self._factors or self._select(pl_module)
        manifold = self._manifold or self.manifold_for(pl_module)
        return [(n, tall(p.detach()), manifold) for n, p in factors]

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = [p for _, p in self._factors] + self._pairs
        self._reduce = reducer_for(params)  # FSDP2: small all-reduces over the shard group
        self._hooks.attach(optimizers_holding(trainer, params, "LandingCallback"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks.detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._hooks.detach()
        self._snapshot = self._a_snapshot = None

    @torch.no_grad()
    def _pre_step(self) -> None:
        self._active = [i for i, (_, p) in enumerate(self._factors) if p.grad is not None]
        self._snapshot = [local(self._factors[i][1].detach()).float().clone()
                          for i in self._active]
        self._a_snapshot = None
        if self.balance_a_lr:
            self._a_snapshot = [local(self._pairs[i].detach()).float().clone()
                                for i in self._active]

    @torch.no_grad()
    def _post_step(self) -> None:
        if self._snapshot is None:
            return
        if self._reduce is not None:
            self._post_step_sharded()
            return
        params = [self._factors[i][1] for i in self._active]
        news = [p.detach().float() for p in params]
        step = stiefel.landing_step if self._manifold == "stiefel" else sphere.landing_step
        outs = apply_grouped(lambda x, b: step(x, b - x, self.mu), self._snapshot, news)
        if self._a_snapshot is not None:
            a_params = [self._pairs[i] for i in self._active]
            a_news = [a.detach().float() for a in a_params]
            a_outs = apply_grouped(self._balanced_a, self._snapshot, self._a_snapshot, a_news)
            for a, value in zip(a_params, a_outs):
                a.copy_(value)
        for p, value in zip(params, outs):
            p.copy_(value)
        self._snapshot = self._a_snapshot = None
        self.num_steps += 1

    def _post_step_sharded(self) -> None:
        """FSDP2: B's local rows, ``r x r`` (or ``r``) products all-reduced
        (:func:`app.manifolds.sharded.landing`); A's scale from all-reduced Gram matrices."""
        assert self._snapshot is not None
        params = [self._factors[i][1] for i in self._active]
        news = [tall_local(p.data) for p in params]
        if self._a_snapshot is not None:
            a_params = [self._pairs[i] for i in self._active]
            grams = torch.stack([torch.stack([b.T @ b, a @ a.T]) for b, a in
                                 zip(self._snapshot, self._a_snapshot)])
            self._reduce(grams)  # B^T B over B's rows, A A^T over A's columns
            b_sq = torch.linalg.eigvalsh(grams[:, 0])[..., -1].clamp_min(0)
            a_sq = torch.linalg.eigvalsh(grams[:, 1])[..., -1].clamp_min(0)
            ratio = torch.sqrt(b_sq / a_sq.clamp_min(torch.finfo(a_sq.dtype).tiny))
            scale = torch.where(a_sq > b_sq, ratio, torch.ones_like(ratio))
            for j, (a, a_old) in enumerate(zip(a_params, self._a_snapshot)):
                a_new = local(a.data)
                a_new.copy_(a_old + scale[j] * (a_new - a_old))
        sharded.landing(self._snapshot, news, self.mu, self._manifold, outs=news,
                        reduce=self._reduce)
        self._snapshot = self._a_snapshot = None
        self.num_steps += 1

    @staticmethod
    def _balanced_a(b_old: Tensor, a_old: Tensor, a_new: Tensor) -> Tensor:
        c = a_step_scale(b_old, a_old)
        return a_old + c[:, None, None] * (a_new - a_old)

    # -- checkpointing --------------------------------------------------------------------
    def state_options(self) -> dict[str, Any]:
        return {"manifold": self.manifold, "mu": self.mu, "patterns": self.patterns,
                "balance_a_lr": self.balance_a_lr}

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_steps = int(state_dict.get("num_steps", 0))
