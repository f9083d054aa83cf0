"""Log measured memory: parameters, optimizer state and the peak, for method comparisons."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from app.optim.memory import (
    optimizer_state_breakdown,
    process_peak_memory_bytes,
    trainable_parameter_bytes,
)

__all__ = ["MemoryMonitor"]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class MemoryMonitor(L.Callback):
    """Measure and log what a method costs in memory (GaLore / GaRare vs LoRA vs full FT).

    Logged to every logger (like Lightning's ``LearningRateMonitor``, through
    ``logger.log_metrics``):

    * at ``on_train_start`` (optimizer built; step ``trainer.global_step``):
      ``params/trainable``, ``params/total``, ``memory/trainable_param_bytes`` and
      ``memory/optimizer_state_bytes`` (0 for Adam-type optimizers, which create their state
      lazily, unless resuming);
    * after the first real optimizer step of the run: ``memory/optimizer_state_bytes`` again
      (now the full state);
    * at ``on_train_end``: ``memory/peak_bytes`` (``torch.cuda.max_memory_allocated`` on a CUDA
      module, its statistics reset at fit start; the process's peak resident set size on CPU,
      which includes everything since the process started), and a one-line summary.

    The numbers are also kept as attributes for other tools (benchmarks, tests):
    ``trainable_params``, ``total_params``, ``trainable_param_bytes``,
    ``optimizer_state_bytes_at_start``, ``optimizer_state_bytes`` (after the first step),
    ``optimizer_state_by_key`` (bytes per state key, e.g. ``exp_avg`` / ``projector``),
    ``peak_bytes`` and ``peak_source`` (``"cuda"`` or ``"rss"``). Nothing needs checkpointing:
    every value is re-measured in each run.

    Args:
        verbose: Print the summary line at the end of training (rank 0).
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.trainable_params: int | None = None
        self.total_params: int | None = None
        self.trainable_param_bytes: int | None = None
        self.optimizer_state_bytes_at_start: int | None = None
        self.optimizer_state_bytes: int | None = None
        self.optimizer_state_by_key: dict[str, int] = {}
        self.peak_bytes: int | None = None
        self.peak_source: str | None = None
        self._start_step = 0
        self._after_step_done = False

    @staticmethod
    def _state(trainer: L.Trainer) -> dict[str, int]:
        merged: dict[str, int] = {}
        for optimizer in trainer.optimizers:
            for key, value in optimizer_state_breakdown(optimizer).items():
                merged[key] = merged.get(key, 0) + value
        return merged

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.parameters())
        self.trainable_params = sum(p.numel() for p in params if p.requires_grad)
        self.total_params = sum(p.numel() for p in params)
        self.trainable_param_bytes = trainable_parameter_bytes(pl_module)
        self.optimizer_state_by_key = self._state(trainer)
        self.optimizer_state_bytes_at_start = sum(self.optimizer_state_by_key.values())
        self._start_step = trainer.global_step
        self._after_step_done = False
        self._log(trainer, {
            "params/trainable": self.trainable_params,
            "params/total": self.total_params,
            "memory/trainable_param_bytes": self.trainable_param_bytes,
            "memory/optimizer_state_bytes": self.optimizer_state_bytes_at_start,
        })

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._after_step_done or trainer.global_step <= self._start_step:
            return  # no real optimizer step yet (gradient accumulation)
        self._after_step_done = True
        self.optimizer_state_by_key = self._state(trainer)
        self.optimizer_state_bytes = sum(self.optimizer_state_by_key.values())
        self._log(trainer, {"memory/optimizer_state_bytes": self.optimizer_state_bytes})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self.peak_source = "cuda" if device.type == "cuda" else "rss"
        self.peak_bytes = process_peak_memory_bytes(device)
        self._log(trainer, {"memory/peak_bytes": self.peak_bytes})
        if self.verbose:
            state = self.optimizer_state_bytes
            if state is None:
                state = self.optimizer_state_bytes_at_start or 0
            rank_zero_info(
                f"memory: trainable {self.trainable_params:,} of {self.total_params:,} params "
                f"({_human(self.trainable_param_bytes or 0)}) | optimizer state {_human(state)} "
                f"{self.optimizer_state_by_key} | peak {_human(self.peak_bytes)} "
                f"({'CUDA allocated' if self.peak_source == 'cuda' else 'process RSS'})")
