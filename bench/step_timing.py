"""Interleaved step timing shared by the step-time benchmarks.

After ``warmup`` untimed steps per method, ``reps`` rounds each time ``steps`` steps of every
method, the order rotating from round to round, so slow drifts of the machine hit all methods
alike (:func:`interleaved_times`); :func:`ratios` gives the ratios of medians, of minima (noise
from other processes only ever adds time: targets are checked on it) and the median of the
per-round ratios.
"""

from __future__ import annotations

import statistics
import time
import types
from collections.abc import Sequence
from typing import Any, Protocol


class Timed(Protocol):
    name: str

    def step(self) -> None: ...


class MethodRunner:
    """One method in a step-time benchmark: its task module (built by the caller from the
    method's fragment), the method's own optimizer over the module's groups, the fragment's
    callbacks hooked in as in training, and one plain training step."""

    def __init__(self, name: str, module: Any, optimizer_factory: Any, callbacks: list,
                 batch: dict, device: Any) -> None:
        self.name, self.module, self.callbacks, self.batch = name, module, callbacks, batch
        self.device = device
        module.configure_model()
        module.to(device).train()
        self.optimizer = module.method.build_optimizer(module.model, optimizer_factory,
                                                       module.parameter_groups())
        setup_callbacks(callbacks, module, self.optimizer, device)
        self.trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)

    def step(self) -> None:
        loss = self.module.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def setup_callbacks(callbacks: list, module: Any, optimizer: Any, device: Any) -> None:
    """Run the callbacks' ``setup`` / ``on_fit_start`` / ``on_train_start`` on a bare module,
    so their optimizer hooks are in place as in training."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    trainer = types.SimpleNamespace(optimizers=[optimizer], precision="32-true",
                                    strategy=SingleDeviceStrategy(device))
    for callback in callbacks:
        callback.setup(trainer, module, "fit")
        callback.on_fit_start(trainer, module)
        callback.on_train_start(trainer, module)


def sync(device: Any) -> None:
    """Wait for the device's queued work (``device``: a ``torch.device`` or its name)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(runner: Timed, steps: int, device: Any) -> float:
    """Seconds per step over ``steps`` consecutive steps of ``runner``."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def interleaved_times(runners: Sequence[Timed], warmup: int, reps: int, steps: int,
                      device: Any) -> dict[str, list[float]]:
    """Per-step seconds of each runner in each of ``reps`` rotating rounds."""
    for runner in runners:
        for _ in range(warmup):
            runner.step()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(reps):
        order = list(runners[rep % len(runners):]) + list(runners[:rep % len(runners)])
        for runner in order:
            times[runner.name].append(timed_steps(runner, steps, device))
    return times


def iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def ratios(times: dict[str, list[float]], name: str, base: str) -> dict[str, float]:
    """``ratio`` (of medians), ``paired_ratio`` (median of same-round ratios), ``min_ratio``."""
    mine, theirs = times[name], times[base]
    return {"ratio": statistics.median(mine) / statistics.median(theirs),
            "paired_ratio": statistics.median(t / b for t, b in zip(mine, theirs)),
            "min_ratio": min(mine) / min(theirs)}


def parse_targets(items: list[str]) -> dict[str, float]:
    """``NAME=RATIO`` pairs."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out
