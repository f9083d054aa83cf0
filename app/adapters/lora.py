r"""Our LoRA-family configs: PEFT ``LoraConfig`` subclasses that re-initialise or constrain factors.

Both configs go through PEFT unchanged (``get_peft_model`` builds plain LoRA layers, forward and
merge are PEFT's); :func:`app.adapters.apply_adapter` then calls ``config.initialize(model)``.
The exported adapter is standard PEFT LoRA (:meth:`AsymmetricLoraConfig.to_dict` drops our own
fields from ``adapter_config.json``), so ``PeftModel.from_pretrained`` loads it exactly.

Notation (the project's method notes): a layer ``y = W x`` with ``W`` ``out x in``;
PEFT's ``lora_A.weight`` is ``r x in``, ``lora_B.weight`` is ``out x r``, ``dW = s B A``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from app.adapters.contract import ROWWISE, ROWWISE_REASON, Constraint, MethodSpec
from app.adapters.peft_family import LoraFamilyConfig
from app.draws import random_orthonormal, seed_of
from app.errors import ConfigError, is_positive_number

__all__ = [
    "AlloraConfig",
    "AsymmetricLoraConfig",
    "draw_frozen_factor",
    "factor_seed",
    "lora_layers",
]

_OPTION = "model.init_args.adapter.init_args"


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer, str]]:
    """Every LoRA layer of ``model`` with one entry per adapter.

    Args:
        model: A ``PeftModel`` or the model PEFT injected layers into.

    Yields:
        ``(name, layer, adapter_name)``; ``name`` is relative to the underlying transformers
        model (``bert.encoder.layer.0.attention.self.query``), so it does not depend on
        whether the ``PeftModel`` wrapper is present.
    """
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                yield name, module, adapter


def factor_seed(init_seed: int, name: str) -> int:
    """Generator seed of one layer's frozen factor, from the run seed and the layer name.

    :func:`app.draws.seed_of` ``(init_seed, name)``: the same on every data-parallel rank, in
    every process and after a restart, and different for every layer.

    Returns:
        A seed in ``[0, 2**63)``.
    """
    return seed_of(init_seed, name)


def draw_frozen_factor(
    n: int, r: int, kind: Literal["orthonormal", "gaussian"], generator: torch.Generator
) -> torch.Tensor:
    r"""A tall ``n x r`` float32 matrix ``X`` for a frozen LoRA factor.

    * ``orthonormal``: :func:`app.draws.random_orthonormal`, ``X = Q`` of
      ``torch.linalg.qr(Z)``, ``Z ~ N(0, 1)^{n x r}``, with the signs of ``diag(R)`` folded
      into ``Q`` (Haar-distributed, unique); ``X^T X = I_r``.
    * ``gaussian``: ``X = Z / sqrt(n)``, so ``E[X^T X] = I_r`` (same scale as orthonormal).

    Args:
        n: Rows (``in_features`` for a frozen A, ``out_features`` for a frozen B).
        r: Rank (``r <= n`` for ``orthonormal``).
        kind: ``"orthonormal"`` or ``"gaussian"``.
        generator: A seeded CPU generator (CPU draws are the same on every machine).
    """
    if kind == "gaussian":
        return torch.randn(n, r, generator=generator, dtype=torch.float32) / math.sqrt(n)
    return random_orthonormal(n, r, generator)


def _freeze_factor(layer: LoraLayer, adapter: str, factor: str) -> None:
    """Freeze ``layer.<factor>[adapter]`` and register it with PEFT's frozen-weight list, so
    PEFT's own ``set_adapter`` / mark-trainable passes keep it frozen."""
    frozen = dict(layer.frozen_peft_weight_names)  # the class-level default is shared: copy
    frozen[adapter] = tuple(dict.fromkeys((*frozen.get(adapter, ()), factor)))
    layer.frozen_peft_weight_names = frozen
    getattr(layer, factor)[adapter].weight.requires_grad_(False)


@dataclass
class AsymmetricLoraConfig(LoraFamilyConfig):
    r"""Asymmetric LoRA: one factor random and frozen, the other zero-initialised and trained.

    Zhu et al., "Asymmetry in Low-Rank Adapters of Foundation Models", ICML 2024. With
    ``frozen_factor="A"`` (the paper's method) every LoRA layer gets
    ``A = Q^T`` from ``Q, R = torch.linalg.qr(randn(in, r))`` (rows orthonormal,
    ``A A^T = I_r``), ``requires_grad=False``, and ``B = 0`` trained: ``dW = s B A`` starts at
    zero and only ``B`` (``out x r``) learns, i.e. the update is ``W + s B Q^T`` in a fixed random
    ``r``-dimensional input subspace. ``frozen_factor="B"`` is the mirror image the paper
    compares against: ``B = Q`` from ``qr(randn(out, r))`` (``B^T B = I_r``) frozen, ``A = 0``
    trained. Forward, merge and export are plain PEFT LoRA.

    Reproducibility: each layer's draw uses its own ``torch.Generator`` (CPU) seeded by
    :func:`factor_seed` ``(init_seed, layer name)``, never the global RNG, so every DDP rank
    and every rebuild gets the same factor. The frozen factor is also stored: PEFT saves
    ``lora_A`` / ``lora_B`` in ``adapter_model.safetensors`` and the project's checkpoints keep
    frozen adapter tensors (:func:`app.adapters.adapter_state_keys`). It is registered in PEFT's
    ``frozen_peft_weight_names``, so PEFT keeps it frozen when it re-marks adapters trainable;
    ``PeftModel.from_pretrained(..., is_trainable=True)`` outside this project does not know
    it and would unfreeze it.

    The explicit ``frozen_factor`` field replaces the positional strategy string of the
    public code, which could silently freeze the wrong factor. Paper GLUE settings: ``r=8``,
    ``lora_alpha=16``, ``lora_dropout=0.05``, classifier trained (``configs/methods/
    asymmetric.yaml``).
    """

    frozen_factor: Literal["A", "B"] = field(
        default="A",
        metadata={"help": "Which LoRA factor is drawn at random and frozen: 'A' (the paper's "
                          "method; B starts at zero and is trained) or 'B' (A trained)."},
    )
    frozen_init: Literal["orthonormal", "gaussian"] = field(
        default="orthonormal",
        metadata={"help": "Distribution of the frozen factor: 'orthonormal' (QR of a Gaussian, "
                          "A A^T = I_r) or 'gaussian' (N(0, 1/n) entries, E[A A^T] = I_r)."},
    )
    init_seed: int = field(
        default=0,
        metadata={"help": "Seed of the frozen factors (with each layer's name); set it to the "
                          "run seed. 0 <= init_seed < 2**31."},
    )

    #: Fields of ours, left out of the exported ``adapter_config.json`` (plain LoRA).
    _own_fields: ClassVar[tuple[str, ...]] = ("frozen_factor", "frozen_init", "init_seed")
    #: Plain LoRA's declaration: every strategy and precision, rank ``r``, PEFT export.
    spec: ClassVar[MethodSpec] = MethodSpec(name="Asymmetric LoRA", rank_field="adapter.r")

    def constraint(self) -> Constraint | None:
        """The frozen orthonormal factor (tall view ``A^T`` or ``B``) on the Stiefel manifold,
        held there by not training it; ``None`` for a Gaussian frozen factor."""
        if self.frozen_init != "orthonormal":
            return None
        return Constraint(factors=(f"lora_{self.frozen_factor}",), manifold="stiefel")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frozen_factor not in ("A", "B"):
            raise ConfigError(f"{_OPTION}.frozen_factor must be 'A' or 'B', got "
                              f"{self.frozen_factor!r}")
        if self.frozen_init not in ("orthonormal", "gaussian"):
            raise ConfigError(f"{_OPTION}.frozen_init must be 'orthonormal' or 'gaussian', got "
                              f"{self.frozen_init!r}")
        if not 0 <= self.init_seed < 2**31:
            raise ConfigError(f"{_OPTION}.init_seed must be in [0, 2**31), got {self.init_seed}")
        if self.init_lora_weights is not True:
            raise ConfigError(
                f"{_OPTION}.init_lora_weights={self.init_lora_weights!r}: Asymmetric LoRA draws "
                "its own factors (frozen_init); leave init_lora_weights at true")
        if self.use_dora:
            raise ConfigError(f"{_OPTION}.use_dora: Asymmetric LoRA is plain LoRA with a frozen "
                              "factor; set use_dora: false")

    def initialize(self, peft_model: torch.nn.Module) -> None:
        """Draw and freeze the frozen factor, zero and train the other, in every LoRA layer.

        Args:
            peft_model: The model returned by ``get_peft_model`` with this config.

        Raises:
            ConfigError: A targeted layer is not linear (embedding / conv LoRA), or ``r``
                exceeds the side of a layer an orthonormal factor is drawn for.
        """
        layers = list(lora_layers(peft_model))
        if not layers:
            raise ConfigError(f"{_OPTION}.target_modules: no LoRA layer was created")
        frozen_name = "lora_A" if self.frozen_factor == "A" else "lora_B"
        trained_name = "lora_B" if self.frozen_factor == "A" else "lora_A"
        with torch.no_grad():
            for name, layer, adapter in layers:
                a = layer.lora_A[adapter]
                b = layer.lora_B[adapter]
                if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
                    raise ConfigError(
                        f"{_OPTION}.target_modules: '{name}' is not a linear layer "
                        f"({type(layer).__name__}); Asymmetric LoRA supports linear layers only")
                r, n_in = a.weight.shape
                n = n_in if self.frozen_factor == "A" else b.weight.shape[0]
                if self.frozen_init == "orthonormal" and r > n:
                    raise ConfigError(
                        f"{_OPTION}.r={r} exceeds the {n} features of '{name}': an orthonormal "
                        f"frozen {self.frozen_factor} needs r <= {n}")
                gen = torch.Generator().manual_seed(factor_seed(self.init_seed, name))
                tall = draw_frozen_factor(n, r, self.frozen_init, gen)
                frozen = getattr(layer, frozen_name)[adapter].weight
                frozen.copy_(tall.T if self.frozen_factor == "A" else tall)
                trained = getattr(layer, trained_name)[adapter].weight
                trained.zero_()
                trained.requires_grad_(True)
                _freeze_factor(layer, adapter, frozen_name)


@dataclass
class AlloraConfig(LoraFamilyConfig):
    r"""ALLoRA: LoRA without dropout and without scaling, trained with an adaptive step size.

    Huang and Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", 2024
    (arXiv:2410.09692). No public code exists; this is our reading. The adapter itself is plain
    PEFT LoRA (A Kaiming-uniform, B zero) with ``lora_dropout = 0`` and scaling
    ``s = lora_alpha / r = 1``; the adaptive rate
    ``c(theta) = 1 / sqrt(||theta||^2 + 1/eta^2)`` is applied to the optimizer's update by
    :class:`app.callbacks.allora.AlloraUpdateScaling`, which reads ``eta`` from here.

    ``lora_alpha`` decision: it is ``None`` by default and then set to ``r`` (scaling 1 at any
    rank, so changing ``r`` needs no second edit). An explicit value different from ``r``
    is an error rather than silently overridden; ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` are refused because they make the scaling differ from 1. Dropout must be 0
    (the paper removes it; an error, not a silent change, because LoRA configs usually set it).
    The export is a standard LoRA adapter with ``lora_alpha = r``, exact.
    """

    lora_alpha: int | None = field(
        default=None,
        metadata={"help": "ALLoRA has no scaling factor: leave unset (= r, scaling 1) or set "
                          "it equal to r."},
    )
    eta: float = field(
        default=2.0,
        metadata={"help": "ALLoRA's eta > 0: c(theta) = 1 / sqrt(||theta||^2 + 1/eta^2) scales "
                          "each update; c = eta at theta = 0 (B's first steps are eta times the "
                          "optimizer's), about 1/||theta|| once ||theta|| >> 1/eta. The default "
                          "2 equals LoRA's usual alpha / r = 16 / 8, so the first effective "
                          "update of dW matches LoRA at that setting."},
    )

    _own_fields: ClassVar[tuple[str, ...]] = ("eta",)
    #: The update scaling is :class:`app.callbacks.allora.AlloraUpdateScaling` (a fit without
    #: it is warned at start-up); row norms need whole factors.
    spec: ClassVar[MethodSpec] = MethodSpec(
        name="ALLoRA", rank_field="adapter.r", strategies=ROWWISE,
        strategy_owner="AlloraUpdateScaling", strategy_reason=ROWWISE_REASON,
        callbacks=("app.callbacks.allora.AlloraUpdateScaling",))

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        super().__post_init__()
        problems = []
        if self.lora_dropout != 0:
            problems.append(f"lora_dropout={self.lora_dropout} (ALLoRA uses no dropout; set 0)")
        if self.lora_alpha != self.r:
            problems.append(f"lora_alpha={self.lora_alpha} with r={self.r} gives scaling "
                            f"{self.lora_alpha / self.r:g} (ALLoRA has none; leave lora_alpha "
                            "unset or equal to r)")
        if self.use_rslora:
            problems.append("use_rslora=true (scaling alpha/sqrt(r) != 1; set false)")
        if self.rank_pattern or self.alpha_pattern:
            problems.append("rank_pattern / alpha_pattern (per-layer scaling != 1; remove them)")
        if self.use_dora:
            problems.append("use_dora=true (DoRA is a different method; set false)")
        if not is_positive_number(self.eta):
            problems.append(f"eta={self.eta} (must be a finite number > 0)")
        if problems:
            raise ConfigError(f"ALLoRA ({_OPTION}): " + "; ".join(problems))

