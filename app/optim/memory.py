"""Measured memory accounting: optimizer-state bytes, trainable-parameter bytes, peak memory.

The GaLore / GaRare paper ("On the Optimization Landscape of Low Rank Adaptation Methods for
LLMs", ICLR 2025) compares methods by analytic counts (per ``p x q`` matrix at rank ``r``:
AdamW ``2pq`` states, GaLore ``r min(p, q)`` projector plus ``2 r max(p, q)`` states, GaRare
``2 r max(p, q)`` states). These helpers measure the real numbers from the live objects so the
project reports what was allocated, not what was assumed.

Tensors that are ``DTensor`` shards (FSDP2) are counted by their local shard, i.e. the bytes
this process holds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "optimizer_state_breakdown",
    "optimizer_state_bytes",
    "process_peak_memory_bytes",
    "tensor_bytes",
    "trainable_parameter_bytes",
]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes held by one tensor in this process (``numel * element_size``).

    Args:
        t: A tensor; a ``DTensor`` is counted by its local shard.

    Returns:
        The exact number of bytes of the tensor's elements (storage sharing is not deduplicated).
    """
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        t = to_local()
    return t.numel() * t.element_size()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor inside a (possibly nested) state value."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def optimizer_state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer state per state key (e.g. ``exp_avg``, ``projector``, ``step``).

    Args:
        optimizer: Any ``torch.optim.Optimizer``; only ``optimizer.state`` is inspected (the
            parameters themselves are not counted).

    Returns:
        ``{state_key: bytes}`` summed over all parameters, keys sorted; empty before the first
        step for optimizers that create state lazily.
    """
    out: dict[str, int] = {}
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            nbytes = sum(tensor_bytes(t) for t in _tensors(value))
            if nbytes or isinstance(value, torch.Tensor):
                out[str(key)] = out.get(str(key), 0) + nbytes
    return dict(sorted(out.items()))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of all tensors in ``optimizer.state``, counted exactly.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.

    Returns:
        Sum of ``numel * element_size`` over every state tensor (including step counters kept
        as tensors).
    """
    return sum(optimizer_state_breakdown(optimizer).values())


def trainable_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` that require gradients.

    Args:
        module: The model; shared (tied) parameters are counted once.

    Returns:
        Sum of ``numel * element_size`` over trainable parameters.
    """
    return sum(tensor_bytes(p) for p in module.parameters() if p.requires_grad)


def process_peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process so far.

    Args:
        device: ``None`` (default): CUDA if it is available and initialised, else host RSS.
            A CUDA device: ``torch.cuda.max_memory_allocated(device)``. ``"cpu"``: host RSS even
            on a machine with CUDA (a CPU run on a GPU machine must not report the GPU peak).

    Returns:
        ``torch.cuda.max_memory_allocated`` (reset it with ``torch.cuda.reset_peak_memory_stats``)
        or the peak resident set size from ``resource.getrusage`` (``ru_maxrss`` is KiB on
        Linux, bytes on macOS), which cannot be reset within a process. Returns 0 where neither
        is available.
    """
    kind = None if device is None else torch.device(device).type
    if kind == "cuda" or (
        kind is None and torch.cuda.is_available() and torch.cuda.is_initialized()
    ):
        return int(torch.cuda.max_memory_allocated(device if kind == "cuda" else None))
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
