"""The precision policy: which dtype each tensor of a run is kept in.

- **Trainable tensors** (full weights under full fine-tuning / GaLore / GaRare, task heads,
  adapters, manifold factors) are fp32 masters under every precision except ``*-true``
  half precisions, whatever dtype the checkpoint was saved in, so their gradients and the
  optimizer state built from them (``zeros_like``) are fp32 too. Under ``*-mixed`` the
  forward pass computes in half precision through autocast; the update is applied in fp32.
- **The frozen base** is kept in ``model.init_args.dtype``: ``auto`` (the default) keeps the
  dtype the checkpoint was saved in under ``*-mixed`` precisions (a bf16-saved LLaMA stays
  bf16: half the memory, and autocast computes in half precision anyway) and loads it as
  fp32 under ``32-true`` (no autocast there to reconcile bf16 weights with fp32 inputs);
  ``float32``, ``bfloat16`` or ``float16`` force a dtype.
- ``bf16-true`` / ``16-true`` are the explicit way to train half-precision weights:
  Lightning converts the whole module after it is built, masters included.

The functions here are plain torch; :class:`app.modules.adapted.AdaptedModule` calls them
when it builds the model and logs :func:`describe` once at start-up.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch

from app.errors import ConfigError

__all__ = ["DtypeOption", "cast_trainable", "check_dtype", "describe", "frozen_load_dtype"]

#: ``model.init_args.dtype``: how the frozen base is kept.
DtypeOption = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float64: "fp64"}


def _is_true_half(precision: str | None) -> bool:
    return precision in ("bf16-true", "16-true")


def _is_full(precision: str | None) -> bool:
    return precision in ("32-true", "32", "64-true", "64")


def check_dtype(option: str, precision: str | None) -> None:
    """Refuse a frozen-base dtype the trainer's precision cannot compute with.

    Raises:
        ConfigError: For an unknown option, or a half-precision base under a full precision
            (``32-true`` has no autocast: fp32 activations meet bf16 weights and fail).
    """
    if option != "auto" and option not in _DTYPES:
        raise ConfigError(f"model.init_args.dtype={option!r}: choose auto, float32, bfloat16 "
                          "or float16")
    if _is_full(precision) and option in ("bfloat16", "float16"):
        raise ConfigError(
            f"model.init_args.dtype={option} with trainer.precision={precision}: a "
            f"half-precision frozen base needs autocast; use trainer.precision bf16-mixed "
            f"(or 16-mixed), or model.init_args.dtype float32")


def frozen_load_dtype(option: str, precision: str | None) -> torch.dtype | str:
    """The ``dtype`` argument for ``from_pretrained``: ``"auto"`` (the checkpoint's own) or
    a torch dtype, as the policy above says."""
    check_dtype(option, precision)
    if option != "auto":
        return _DTYPES[option]
    return torch.float32 if _is_full(precision) else "auto"


def cast_trainable(model: torch.nn.Module, precision: str | None,
                   dtype: torch.dtype = torch.float32) -> int:
    """Make every trainable floating-point parameter ``dtype`` (fp32 masters), in place.

    The ``Parameter`` objects are kept (``param.data`` is replaced), so tied weights stay
    tied and nothing that holds a reference is stale. Under ``bf16-true`` / ``16-true``
    nothing is cast here: Lightning converts the whole module after it is built.

    Returns:
        The number of tensors cast.
    """
    if _is_true_half(precision):
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def _summary(params: list[torch.Tensor]) -> str:
    counts: Counter[torch.dtype] = Counter()
    for p in params:
        counts[p.dtype] += p.numel()
    if not counts:
        return "none"
    return ", ".join(f"{_SHORT.get(d, str(d))} {n:,}" for d, n in counts.most_common())


def describe(model: torch.nn.Module, precision: str | None, option: str) -> str:
    """One start-up line: the compute precision and the dtypes of trainable and frozen
    parameters (element counts), e.g. ``precision bf16-mixed | trainable fp32 1,234 |
    frozen bf16 5,678 (dtype auto) | optimizer state follows the trainable dtype``."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    note = " (converted to the compute dtype by the trainer)" if _is_true_half(precision) else ""
    return (f"precision {precision or 'not set (no trainer)'}{note} | trainable "
            f"{_summary(trainable)} | frozen {_summary(frozen)} (model.init_args.dtype "
            f"{option}) | optimizer state follows the trainable dtype")
