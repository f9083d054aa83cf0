r"""Manifold-LoRA: PEFT LoRA with ``B`` kept (asymptotically) on a manifold by landing steps.

"Retraction-free optimization over the Stiefel manifold with application to the LoRA
fine-tuning" (Manifold-LoRA). No public code exists; this is our reading (METHODS.md).

The adapter is plain PEFT LoRA, :math:`\Delta W = s\, B A` with ``lora_B.weight`` = ``B``
(``out x r``) and ``lora_A.weight`` = ``A`` (``r x in``). Only the initialisation differs:

- ``B`` orthonormal, :math:`B^T B = I_r`: QR of a Gaussian drawn from a generator seeded
  with ``init_seed`` (identical on every data-parallel rank), with the sign fix of
  :func:`app.draws.random_orthonormal`;
- ``A = 0``, so :math:`\Delta W = 0` at the start (LoRA's own ``B = 0`` is not on the manifold).

The ``"sphere"`` variant (oblique manifold: every column of ``B`` has unit norm) uses the same
orthonormal ``B``: orthonormal columns are unit-norm columns, and both variants then start from
the same point, so a comparison between them differs only in the constraint.

Training the constraint is :class:`app.callbacks.landing.LandingCallback`'s job; the exported
adapter is ordinary LoRA (PEFT's own ``save_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from app.adapters.contract import (
    FP32_MASTER_PRECISIONS,
    ROWWISE,
    ROWWISE_REASON,
    Constraint,
    MethodSpec,
)
from app.adapters.peft_family import LoraFamilyConfig
from app.draws import random_orthonormal
from app.errors import ConfigError

__all__ = ["ManifoldLoraConfig"]

_OPTION = "model.init_args.adapter.init_args"


@dataclass
class ManifoldLoraConfig(LoraFamilyConfig):
    """``peft.LoraConfig`` plus the Manifold-LoRA init; train with ``LandingCallback``.

    All ``LoraConfig`` options apply (``r``, ``lora_alpha``, ``target_modules``,
    ``lora_dropout``, ``use_rslora``, ...) except DoRA and the inits that rewrite the base
    weights (PiSSA, OLoRA, LoftQ, ...), which are refused: :meth:`initialize` overwrites both
    factors.

    Declaration (:mod:`app.adapters.contract`): ``B`` is constrained to ``manifold`` by
    :class:`app.callbacks.landing.LandingCallback`, which reads the manifold and the factor
    names from :meth:`constraint` (a fit without it is warned at start-up);
    ``B`` is kept out of weight decay; single device or DDP; fp32 master weights; rank ``r``;
    plain PEFT LoRA export.

    Args:
        manifold: ``"stiefel"`` (``B^T B = I``) or ``"sphere"`` (unit-norm columns of ``B``).
        init_seed: Seed of ``B``'s orthonormal init (its own generator).
    """

    manifold: Literal["stiefel", "sphere"] = field(
        default="stiefel",
        metadata={"help": "Constraint on B: 'stiefel' (B^T B = I) or 'sphere' (unit columns)."},
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of B's orthonormal init."})

    spec: ClassVar[MethodSpec] = MethodSpec(
        name="Manifold-LoRA", rank_field="adapter.r", strategies=ROWWISE,
        strategy_owner="LandingCallback", strategy_reason=ROWWISE_REASON,
        precisions=FP32_MASTER_PRECISIONS, precision_owner="LandingCallback",
        no_decay=("lora_B",), callbacks=("app.callbacks.landing.LandingCallback",))
    #: Fields of this class only; the exported adapter is plain LoRA without them.
    _own_fields: ClassVar[tuple[str, ...]] = ("manifold", "init_seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.manifold not in ("stiefel", "sphere"):
            raise ConfigError(f"{_OPTION}.manifold must be 'stiefel' or 'sphere', "
                              f"got {self.manifold!r}")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise ConfigError(f"{_OPTION}.init_seed must be an integer, got {self.init_seed!r}")
        if self.use_dora:
            raise ConfigError(f"{_OPTION}.use_dora: DoRA is not supported by Manifold-LoRA")
        init = self.init_lora_weights
        if isinstance(init, str) and init != "gaussian":
            raise ConfigError(f"{_OPTION}.init_lora_weights={init!r} rewrites the base weights; "
                              "Manifold-LoRA sets B and A itself (use true)")

    def constraint(self) -> Constraint:
        """``B`` on ``manifold``, asymptotically (landing); its partner factor is ``A``."""
        return Constraint(factors=("lora_B",), manifold=self.manifold,
                          callback="app.callbacks.landing.LandingCallback", exact=False,
                          partners=("lora_A",))

    @torch.no_grad()
    def initialize(self, peft_model: torch.nn.Module, adapter_name: str = "default") -> None:
        r"""Set every ``lora_B`` to an orthonormal ``out x r`` matrix and every ``lora_A`` to 0.

        Layers are visited in ``named_modules`` order with one generator seeded by
        ``init_seed``, so the factors are the same on every rank and every rebuild.

        Raises:
            ConfigError: For a non-Linear LoRA layer (embeddings, convolutions) or a layer
                with fewer output features than ``r`` (no ``out x r`` orthonormal matrix).
        """
        from peft.tuners.lora import LoraLayer

        gen = torch.Generator().manual_seed(self.init_seed)
        found = 0
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if adapter_name not in module.lora_B:
                if adapter_name in getattr(module, "lora_embedding_B", {}):
                    raise ConfigError(f"{_OPTION}.target_modules: {name} is an embedding; "
                                      "Manifold-LoRA supports Linear layers only")
                continue
            b_layer, a_layer = module.lora_B[adapter_name], module.lora_A[adapter_name]
            if not isinstance(b_layer, torch.nn.Linear):
                raise ConfigError(f"{_OPTION}.target_modules: {name} is a "
                                  f"{type(b_layer).__name__} LoRA layer; Linear only")
            out_features, r = b_layer.weight.shape
            if out_features < r:
                raise ConfigError(f"{_OPTION}.r={r} exceeds layer {name}'s out_features="
                                  f"{out_features}: B ({out_features} x {r}) cannot be "
                                  "orthonormal")
            b = random_orthonormal(out_features, r, gen)
            b_layer.weight.copy_(b.to(b_layer.weight))
            a_layer.weight.zero_()
            found += 1
        if not found:
            raise ConfigError(f"{_OPTION}.target_modules: no LoRA layer was created")
