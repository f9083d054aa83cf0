r"""Exact float32 matrix products for the manifold steps, whatever TF32 setting a user chose.

TensorFloat-32 rounds a float32 product's inputs to 10 mantissa bits (relative error about
``5e-4``). A polar retraction computed from TF32 Gram products is orthonormal to about
``1e-3`` only, and the error compounds over steps. :func:`exact_float32` sets every backend's
float32 precision to IEEE (``"highest"``) for the block it wraps and restores the user's
settings afterwards, through the same API family the user set them with:

- PyTorch >= 2.9: the per-backend ``fp32_precision`` attributes (``torch.backends.cuda.matmul``,
  ``torch.backends.cudnn.conv`` / ``.rnn``, ``torch.backends.mkldnn.matmul`` ...). They are
  read and written as stored, so a user who set the legacy ``allow_tf32`` flags or
  ``torch.set_float32_matmul_precision`` reads the same values back afterwards;
- older PyTorch: ``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``
  and ``torch.set_float32_matmul_precision``.

Setting a precision is a host-side flag: no device synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exact_float32", "precision_state"]


def _new_api_slots() -> list[object]:
    b = torch.backends
    slots = [b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)]
    mkldnn = getattr(b, "mkldnn", None)
    if mkldnn is not None:
        slots += [getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None),
                  getattr(mkldnn, "rnn", None)]
    return [s for s in slots if s is not None and hasattr(s, "fp32_precision")]


def precision_state() -> tuple:
    """The current float32 precision settings (comparable with ``==``)."""
    slots = _new_api_slots()
    if slots:
        return tuple(s.fp32_precision for s in slots)
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Run the block with IEEE float32 matmuls and convolutions (no TF32, no bf16 passes);
    the previous settings are restored on exit, also when the block raises."""
    slots = _new_api_slots()
    if slots:
        saved = [s.fp32_precision for s in slots]
        try:
            for s in slots:
                s.fp32_precision = "ieee"
            yield
        finally:
            for s, value in zip(slots, saved):
                s.fp32_precision = value
        return
    saved_legacy = precision_state()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_legacy[0]
        torch.backends.cudnn.allow_tf32 = saved_legacy[1]
        torch.set_float32_matmul_precision(saved_legacy[2])
