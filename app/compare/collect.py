"""Turn one finished run folder into the numbers a comparison reports (``result.json``).

Sources, all inside the run folder: the TensorBoard events (validation metrics,
``manifold/drift_max``, and MemoryMonitor's ``params/*`` and ``memory/*`` scalars), the
``timing.json`` of :class:`app.compare.timing.StepTimer` (loss curve, step times, and
MemoryMonitor's exact integer counts, preferred over the float32 TensorBoard copies), and the
exported ``adapter/`` folder.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

__all__ = ["best_and_final", "collect_run", "folder_bytes", "machine", "machine_label",
           "metric_values", "read_scalars"]

Curve = list[tuple[int, float]]


def machine() -> dict[str, Any]:
    """CPU model, torch version and threads, Python and GPU (if any) of this machine: each run's
    ``result.json`` records it, since step times compare only between runs of one machine."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpu": cpu, "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_label(result: dict[str, Any]) -> str:
    """The machine a run's step times come from: its GPU, else its CPU model."""
    info = result.get("machine") or {}
    return info.get("gpu") or info.get("cpu") or "not recorded"


def read_scalars(run_dir: Path) -> dict[str, Curve]:
    """Every scalar tag of the TensorBoard events in ``run_dir`` as ``[(step, value), ...]``.

    All events are kept (no reservoir sampling). Events written by a resumed process replace
    those of the crashed one from the resume step on (TensorBoard's orphan purging), and a
    step logged twice keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, Curve] = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def best_and_final(curve: Curve, mode: str = "max") -> dict[str, Any]:
    """Best (by ``mode``, NaN ignored) and final value of a metric curve, with their steps."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    finite = [(s, v) for s, v in curve if math.isfinite(v)]
    out: dict[str, Any] = {"best": None, "best_step": None, "final": None, "final_step": None}
    if finite:
        pick = max if mode == "max" else min
        out["best_step"], out["best"] = pick(finite, key=lambda sv: sv[1])
    if curve:
        out["final_step"], last = curve[-1]
        out["final"] = _finite(last)
    return out


def metric_values(result: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """``best`` / ``final`` of ``metric`` for a result dict, recomputed from its validation
    curves when it was collected for another metric or mode."""
    if result.get("metric") == metric and result.get("mode", "max") == mode:
        return {k: result.get(k) for k in ("best", "best_step", "final", "final_step")}
    curve = (result.get("val_curves") or {}).get(metric) or {"step": [], "value": []}
    pairs = [(int(s), float("nan") if v is None else float(v))
             for s, v in zip(curve["step"], curve["value"])]
    return best_and_final(pairs, mode)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def folder_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Total size of the files under ``path`` (0 if it does not exist), optionally only
    those whose name ends with one of ``suffixes``."""
    if not path.exists():
        return 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files
               if suffixes is None or p.name.endswith(suffixes))


def _last(curve: Curve | None) -> float | None:
    return curve[-1][1] if curve else None


def _as_int(value: Any) -> int | None:
    return None if value is None else int(round(float(value)))


def collect_run(run_dir: Path, metric: str = "val/score", mode: str = "max",
                adapter_dir: str = "adapter") -> dict[str, Any]:
    """The numbers of one run.

    Args:
        run_dir: The run folder (TensorBoard events, ``timing.json``, ``adapter/``).
        metric: The validation metric compared across methods.
        mode: ``max`` if larger is better, else ``min``.
        adapter_dir: The exported adapter's folder inside ``run_dir``; ``adapter_bytes`` is
            the size of its weight files (the whole model for full fine-tuning).

    Returns:
        A JSON-ready dict; a number that could not be measured is ``None``.
    """
    scalars = read_scalars(run_dir)
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    memory = timing.get("memory") or {}

    val_tags = sorted(t for t in scalars if t.startswith("val/"))
    # Lightning logs validation inside fit at the step index before its increment
    # (``_batches_that_stepped``); +1 makes every step here "optimizer steps done", like the
    # loss curve, ``trainer.global_step`` and the checkpoint names.
    for tag in val_tags:
        scalars[tag] = [(s + 1, v) for s, v in scalars[tag]]
    result: dict[str, Any] = {"metric": metric, "mode": mode,
                              **best_and_final(scalars.get(metric, []), mode)}
    at_best: dict[str, float | None] = {}
    if result["best_step"] is not None:
        for tag in val_tags:
            by_step = dict(scalars[tag])
            at_best[tag] = _finite(by_step.get(result["best_step"]))
    result["metrics_at_best"] = at_best
    result["metrics_final"] = {tag: _finite(_last(scalars[tag])) for tag in val_tags}
    result["val_curves"] = {tag: {"step": [s for s, _ in scalars[tag]],
                                  "value": [_finite(v) for _, v in scalars[tag]]}
                            for tag in val_tags}

    curve = timing.get("loss_curve")
    if not curve or not curve.get("step"):
        tb = scalars.get("train/loss", [])
        curve = {"step": [s for s, _ in tb], "loss": [v for _, v in tb]}
    result["loss_curve"] = {"step": list(curve["step"]),
                            "loss": [_finite(v) for v in curve["loss"]]}

    for key in ("time_per_step_s", "time_per_step_std_s", "time_per_step_median_s",
                "timed_steps", "samples_per_s",
                "warmup_steps", "device", "precision", "world_size", "global_step"):
        result[key] = timing.get(key)

    peak = memory.get("peak_bytes")
    result["peak_memory_bytes"] = _as_int(peak if peak is not None else
                                          _last(scalars.get("memory/peak_bytes")))
    result["peak_memory_source"] = memory.get("peak_source")
    state = memory.get("optimizer_state_bytes")
    if state is None:  # after the first step; TensorBoard keeps the last value logged
        state = _last(scalars.get("memory/optimizer_state_bytes"))
    result["optimizer_state_bytes"] = _as_int(state)
    trainable = memory.get("trainable_params", timing.get("trainable_params"))
    result["trainable_params"] = _as_int(trainable if trainable is not None else
                                         _last(scalars.get("params/trainable")))
    total = memory.get("total_params")
    result["total_params"] = _as_int(total if total is not None else
                                     _last(scalars.get("params/total")))
    # The weight files only; the folder also holds the tokenizer and configs.
    result["adapter_bytes"] = folder_bytes(run_dir / adapter_dir, WEIGHT_SUFFIXES)
    result["adapter_folder_bytes"] = folder_bytes(run_dir / adapter_dir)
    # Largest finite drift, logged or measured at the end; a diverged factor (NaN / inf) is
    # counted separately.
    drift = [v for _, v in scalars.get("manifold/drift_max", [])]
    if timing.get("drift_at_end") is not None:
        drift.append(float(timing["drift_at_end"]))
    finite_drift = [v for v in drift if math.isfinite(v)]
    result["drift_max"] = max(finite_drift) if finite_drift else None
    result["drift_nonfinite"] = len(drift) - len(finite_drift) if drift else None
    return result
