r"""Log how far constrained adapter factors are from their manifold.

For every constrained factor ``X`` (tall ``n x p``): Stiefel drift :math:`\|X^T X - I\|_F`
(:func:`app.manifolds.stiefel.drift`), sphere / oblique drift
:math:`\|\operatorname{diag}(X^T X) - 1\|_2` (:func:`app.manifolds.sphere.drift`). Logged as
``manifold/drift_max`` and ``manifold/drift_mean`` every ``every_n_steps`` optimizer steps
(METHODS.md, shared rule 6). Retraction-based methods (StelLA) sit at rounding level (~1e-6
in fp32); landing (Manifold-LoRA) is only asymptotically on the manifold, so its drift is the
number to watch.

Factors come from every callback in ``trainer.callbacks`` with a method
``constrained_factors(pl_module) -> list[(name, tall view, "stiefel" | "sphere")]`` (the
protocol of :class:`app.callbacks.stella.StellaCallback` and
:class:`app.callbacks.landing.LandingCallback`; the order of callbacks does not matter), plus
parameters selected by ``patterns``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from app.callbacks.factors import reducer_for
from app.callbacks.state import StatefulCallback
from app.errors import ConfigError, is_positive_number
from app.manifolds import sharded, sphere, stiefel
from app.manifolds.batching import apply_grouped

__all__ = ["OrthogonalityDrift"]

_DRIFT = {"stiefel": stiefel.drift, "sphere": sphere.drift}


class OrthogonalityDrift(StatefulCallback):
    """Log ``manifold/drift_max`` and ``manifold/drift_mean``; optionally stop on a threshold.

    Args:
        every_n_steps: Measure every this many optimizer steps (``trainer.global_step``).
        threshold: If the largest drift exceeds it, stop training (``trainer.should_stop``)
            with a warning naming the worst factor; ``None``: never stop.
        patterns: Extra parameters to watch, by name substring (2-D, tall form taken).
        manifold: The manifold of the ``patterns`` factors.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        threshold: float | None = None,
        patterns: Sequence[str] | None = None,
        manifold: Literal["stiefel", "sphere"] = "stiefel",
    ) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"OrthogonalityDrift every_n_steps must be >= 1, "
                              f"got {every_n_steps}")
        if threshold is not None and not is_positive_number(threshold):
            raise ConfigError(f"OrthogonalityDrift threshold must be positive or null, "
                              f"got {threshold}")
        if manifold not in _DRIFT:
            raise ConfigError(f"OrthogonalityDrift manifold must be 'stiefel' or 'sphere', "
                              f"got {manifold!r}")
        if isinstance(patterns, str):
            patterns = [patterns]
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.patterns = tuple(patterns or ())
        self.manifold = manifold
        #: Last measurement: ``{"step", "max", "mean", "worst"}`` (checkpointed).
        self.last: dict[str, Any] = {}
        #: The message given when the threshold stopped training.
        self.stop_message: str | None = None
        self._last_step = -1

    def factors(self, trainer: L.Trainer, pl_module: L.LightningModule
                ) -> list[tuple[str, Tensor, str]]:
        """All watched factors, de-duplicated by name: ``(name, tall n x p view, manifold)``."""
        found: dict[str, tuple[Tensor, str]] = {}
        for callback in trainer.callbacks:
            provide = getattr(callback, "constrained_factors", None)
            if callback is self or not callable(provide):
                continue
            for name, x, manifold in provide(pl_module):
                found.setdefault(name, (x, manifold))
        if self.patterns:
            for name, p in pl_module.named_parameters():
                if p.ndim == 2 and any(pat in name for pat in self.patterns):
                    x = p.detach()
                    found.setdefault(name, (x if x.shape[0] >= x.shape[1] else x.T,
                                            self.manifold))
        return [(n, x, m) for n, (x, m) in found.items()]

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Drift of every watched factor, ``{name: drift}`` (one batched call per group)."""
        factors = self.factors(trainer, pl_module)
        out: dict[str, float] = {}
        for manifold, fn in _DRIFT.items():
            chosen = [(n, x) for n, x, m in factors if m == manifold]
            if chosen:
                xs = [x for _, x in chosen]
                reduce = reducer_for(xs)
                if reduce is not None:  # FSDP2: local rows, one small all-reduce per group
                    flat = sharded.drift([sharded.local_rows(x) for x in xs], manifold, reduce)
                else:
                    flat = torch.stack([v.reshape(()) for v in apply_grouped(fn, xs)]).tolist()
                out.update(zip([n for n, _ in chosen], flat))
        return out

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.factors(trainer, pl_module):
            raise ConfigError(
                "OrthogonalityDrift found no constrained factor: add StellaCallback or "
                "LandingCallback to trainer.callbacks, or set OrthogonalityDrift patterns")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        drifts = self.measure(trainer, pl_module)
        worst = max(drifts, key=drifts.__getitem__)
        top, mean = drifts[worst], sum(drifts.values()) / len(drifts)
        self.last = {"step": step, "max": top, "mean": mean, "worst": worst}
        pl_module.log("manifold/drift_max", top, on_step=True, on_epoch=False)
        pl_module.log("manifold/drift_mean", mean, on_step=True, on_epoch=False)
        if self.threshold is not None and not top <= self.threshold:  # NaN stops too
            self.stop_message = (
                f"OrthogonalityDrift: drift {top:.3e} of {worst} exceeds threshold="
                f"{self.threshold:g} at step {step}; stopping training (lower the learning "
                "rate, or raise OrthogonalityDrift threshold)")
            trainer.should_stop = True
            rank_zero_warn(self.stop_message)

    def state_options(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "threshold": self.threshold,
                "patterns": self.patterns, "manifold": self.manifold}

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))
        self._last_step = int(state_dict.get("last_step", -1))
