"""Time every optimizer step, count samples and keep the training-loss curve of a run.

:class:`StepTimer` is what ``python -m app.compare`` adds to every run
(``--trainer.callbacks+=app.compare.timing.StepTimer``); it works in any ``fit`` too.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from app.callbacks.drift_monitor import OrthogonalityDrift
from app.callbacks.memory_monitor import MemoryMonitor
from app.callbacks.state import StatefulCallback

__all__ = ["StepTimer", "batch_size_of"]

_MEMORY_FIELDS = ("trainable_params", "total_params", "trainable_param_bytes",
                  "optimizer_state_bytes_at_start", "optimizer_state_bytes", "peak_bytes",
                  "peak_source")


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (0 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            n = batch_size_of(value)
            if n:
                return n
    return 0


class StepTimer(StatefulCallback):
    """Record wall time per optimizer step (after a warm-up), samples/s and the loss per step.

    A step is timed from ``on_train_batch_start`` of its first micro-batch to the
    ``on_train_batch_end`` in which ``trainer.global_step`` advances: forward, backward,
    gradient clipping and ``optimizer.step()`` with every optimizer-step hook (the StelLA
    retraction, the landing step, GaLore projections). Data loading, validation and
    checkpointing fall outside. On CUDA the device is synchronised at both ends.

    The first ``warmup_steps`` optimizer steps of each process are not timed (allocator,
    kernel selection, lazily created optimizer state); a resumed run warms up again. Samples/s
    is ``samples in timed steps * world size / time of timed steps``. The loss of a step is the
    mean over its micro-batches on this process (global rank 0).

    If the run has an :class:`OrthogonalityDrift` monitor, the largest drift is also measured
    once at ``on_train_end`` (``drift_at_end``), so a run shorter than the monitor's
    ``every_n_steps`` still reports one.

    At ``on_fit_end`` of a run not stopped by a signal, global rank 0 writes a JSON file
    (atomically) with the loss curve, the step times and summary numbers; a
    :class:`MemoryMonitor` in ``trainer.callbacks``, if any, adds its exact counts under
    ``"memory"``.

    Args:
        warmup_steps: Optimizer steps at the start of each process that are not timed.
        dump_path: Where the JSON goes: ``None`` = ``<trainer.log_dir>/timing.json``; a
            relative path is taken inside ``trainer.log_dir``.
    """

    def __init__(self, warmup_steps: int = 5, dump_path: str | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"StepTimer warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.dump_path = dump_path
        #: ``(global_step, loss)`` per optimizer step, over the whole run (checkpointed).
        self.loss_curve: list[tuple[int, float]] = []
        #: ``(global_step, seconds, samples)`` per timed step, over the whole run (checkpointed).
        self.step_times: list[tuple[int, float, int]] = []
        self.trainable_params: int | None = None
        self.drift_at_end: float | None = None
        self.written: Path | None = None
        self._warm_left = warmup_steps
        self._t0: float | None = None
        self._start_step = 0
        self._samples = 0
        self._loss = 0.0
        self._train_start: float | None = None
        self._train_seconds = 0.0

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def summary(self, world_size: int = 1) -> dict[str, Any]:
        """Mean and median time per timed step (s), its spread and samples/s over all
        processes. The median is what comparison tables show: one slow step (a page fault,
        another process taking the core) moves the mean but not the median."""
        seconds = [t for _, t, _ in self.step_times]
        samples = sum(n for _, _, n in self.step_times)
        total = sum(seconds)
        mean = total / len(seconds) if seconds else None
        std = None
        if len(seconds) > 1 and mean is not None:
            std = (sum((t - mean) ** 2 for t in seconds) / (len(seconds) - 1)) ** 0.5
        return {"time_per_step_s": mean, "time_per_step_std_s": std,
                "time_per_step_median_s": statistics.median(seconds) if seconds else None,
                "timed_steps": len(seconds),
                "samples_per_s": samples * world_size / total if total > 0 else None}

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._warm_left = self.warmup_steps
        self._t0 = None
        self.trainable_params = sum(p.numel() for p in pl_module.parameters()
                                    if p.requires_grad)
        self._train_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()
            self._start_step = trainer.global_step
            self._samples = 0
            self._loss = 0.0
        self._samples += batch_size_of(batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch loss by accumulate_grad_batches: the sum over
            # the micro-batches of a step is the step's mean loss.
            self._loss += float(loss.detach())
        if self._t0 is None or trainer.global_step <= self._start_step:
            return  # gradient accumulation: the step is not finished
        self._sync(pl_module)
        seconds = time.perf_counter() - self._t0
        step = trainer.global_step
        self.loss_curve.append((step, self._loss))
        if self._warm_left > 0:
            self._warm_left -= 1
        else:
            self.step_times.append((step, seconds, self._samples))
        self._t0 = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_start is not None:
            self._train_seconds += time.perf_counter() - self._train_start
            self._train_start = None
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, OrthogonalityDrift)]
        if monitors:
            drifts = monitors[0].measure(trainer, pl_module)
            self.drift_at_end = max(drifts.values(), default=None)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank must ask, not rank 0 alone
        if not trainer.is_global_zero:
            return
        if trainer.interrupted or getattr(trainer, "received_sigterm", False):
            return  # stopped by a signal: not a result (the comparison resumes such a run)
        path = Path(self.dump_path) if self.dump_path else Path("timing.json")
        if not path.is_absolute():
            path = Path(log_dir or trainer.default_root_dir) / path
        payload: dict[str, Any] = {
            "warmup_steps": self.warmup_steps,
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "device": (torch.cuda.get_device_name(pl_module.device)
                       if pl_module.device.type == "cuda" else pl_module.device.type),
            "precision": str(trainer.precision),
            "global_step": trainer.global_step,
            "trainable_params": self.trainable_params,
            "drift_at_end": self.drift_at_end,
            "train_seconds_this_process": self._train_seconds,
            **self.summary(trainer.world_size),
            "loss_curve": {"step": [s for s, _ in self.loss_curve],
                           "loss": [v for _, v in self.loss_curve]},
            "step_times": {"step": [s for s, _, _ in self.step_times],
                           "seconds": [t for _, t, _ in self.step_times]},
        }
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, MemoryMonitor)]
        if monitors:
            payload["memory"] = {k: getattr(monitors[0], k, None) for k in _MEMORY_FIELDS}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)
        self.written = path

    # -- checkpointing --------------------------------------------------------------------
    def state_options(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps}

    def state_dict(self) -> dict[str, Any]:
        return {"loss_curve": [list(x) for x in self.loss_curve],
                "step_times": [list(x) for x in self.step_times]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_curve = [(int(s), float(v)) for s, v in state_dict.get("loss_curve", [])]
        self.step_times = [(int(s), float(t), int(n))
                           for s, t, n in state_dict.get("step_times", [])]
