"""Methods that train the full weights: full fine-tuning and the optimizer-side methods.

With ``adapter: null`` the method is :class:`FullWeights`: every weight trainable, exported as
a complete Hugging Face model. Its :class:`~app.adapters.contract.MethodSpec` is
:data:`FULL_SPEC`, unless the optimizer class declares its own ``spec`` (GaLore and GaRare in
:mod:`app.optim.galore`: the rank is the optimizer's, sharded strategies are refused).
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.adapters.contract import Method, MethodSpec

__all__ = ["FULL_SPEC", "FullWeights"]

#: Full fine-tuning: no rank, every strategy, every precision.
FULL_SPEC = MethodSpec(name="full fine-tuning", rank_field=None)


class FullWeights(Method):
    """Every weight trainable; the export is the whole model (``save_pretrained``).

    Args:
        spec: :data:`FULL_SPEC`, or the optimizer class's ``spec``.
    """

    def __init__(self, spec: MethodSpec = FULL_SPEC) -> None:
        self.spec = spec  # type: ignore[misc]  # instance-level: the optimizer's declaration

    def apply(self, model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def export(self, model: torch.nn.Module, folder: Path, base_path: str) -> None:
        model.save_pretrained(str(folder))
