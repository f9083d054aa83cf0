"""Whether a tensor is a sharded ``DTensor`` (FSDP2 / tensor parallelism), in one place."""

from __future__ import annotations

import torch

__all__ = ["is_dtensor"]


def is_dtensor(t: torch.Tensor) -> bool:
    """``True`` for a ``torch.distributed.tensor.DTensor`` (a parameter sharded across ranks)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
