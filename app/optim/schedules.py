"""Learning-rate schedules whose length is set once the Trainer knows the number of steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecay(LambdaLR):
    """Linear warm-up from 0 to the base rate, then linear (or cosine) decay to 0.

    The total number of optimizer steps is usually unknown when the YAML is parsed; leave
    ``total_steps`` at ``None`` and the task module calls :meth:`set_total_steps` with
    ``trainer.estimated_stepping_batches`` before training starts.

    Args:
        optimizer: The wrapped optimizer.
        warmup: Warm-up length: a fraction of the total steps if below 1, else a step count.
        total_steps: Total optimizer steps; ``None`` until :meth:`set_total_steps`.
        decay: ``linear``, ``cosine`` or ``constant`` after warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.06,
        total_steps: int | None = None,
        decay: str = "linear",
    ) -> None:
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"decay must be linear, cosine or constant, got {decay!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.total_steps = total_steps
        self.decay = decay
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule length (called by the module in ``configure_optimizers``)."""
        self.total_steps = max(1, int(total_steps))
        factor = self._factor(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in optimizer steps."""
        if self.warmup >= 1:
            return int(self.warmup)
        return int(self.warmup * (self.total_steps or 0))

    def _factor(self, step: int) -> float:
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / (warm + 1)
        if self.decay == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
