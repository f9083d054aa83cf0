r"""StelLA: a three-factor adapter :math:`\Delta W = s\, U S V^T` with ``U``, ``V`` on Stiefel.

Z. Li, S. Sajadmanesh, J. Li, L. Lyu, "StelLA: Subspace Learning in Low-rank Adaptation using
Stiefel Manifold", NeurIPS 2025 (public code: github.com/SonyResearch/stella).

Every targeted ``nn.Linear`` ``y = W x + b`` becomes a :class:`StellaLinear`:

.. math::

    y = W x + b + s\, U S V^T \operatorname{dropout}(x), \qquad s = \alpha / r

with ``U`` (``out x r``) and ``V`` (``in x r``) orthonormal (``U^T U = V^T V = I_r``) and
``S`` free (``r x r``, or a diagonal vector). The base weight is frozen and left unchanged, so
the adapter is non-zero at the start (the paper's "non-zero init"). Keeping ``U`` and ``V`` on
the manifold is the job of :class:`app.callbacks.stella.StellaCallback`; this module only
builds, merges and exports the layers.

Export: :math:`s\, U S V^T = B A` with ``B = s U S`` and ``A = V^T`` is exactly a LoRA
adapter with PEFT scaling 1 (``lora_alpha = r``), so :meth:`StellaConfig.export` writes the
standard PEFT LoRA format that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from app.adapters import head_module_names
from app.adapters.contract import (
    FP32_MASTER_PRECISIONS,
    ROWWISE,
    ROWWISE_REASON,
    AdapterConfig,
    Constraint,
    MethodSpec,
)
from app.adapters.targets import (
    default_query_value_targets,
    matches_target,
    peft_default_targets,
)
from app.draws import random_orthonormal
from app.errors import ConfigError, is_positive_number

__all__ = ["StellaConfig", "StellaLinear"]

_OPTION = "model.init_args.adapter.init_args"
#: The layer's parameter names (the constraint and the export select by them).
_U, _V, _S = "stella_U", "stella_V", "stella_S"
_CALLBACK = "app.callbacks.stella.StellaCallback"


class StellaLinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus the StelLA update :math:`s\, U S V^T`.

    Parameters (named so that :meth:`StellaConfig.constraint` selects them by substring):

    - ``stella_V.weight``: :math:`V^T`, ``r x in`` (an ``nn.Linear(in, r)`` weight),
    - ``stella_S``: ``S``, ``r x r`` (``s_mode="full"``) or ``r`` (``"diagonal"``),
    - ``stella_U.weight``: ``U``, ``out x r`` (an ``nn.Linear(r, out)`` weight).

    Factors are float32 whatever the base dtype (the Riemannian step needs fp32 master
    weights); the input is cast to their dtype and the update back to the output dtype.

    Args:
        base: The pretrained layer (kept as ``base_layer``, frozen).
        r: Rank.
        scale: ``s = alpha / r``.
        s_mode: ``"full"`` or ``"diagonal"``.
        dropout: Dropout probability on the adapter input.
        u: Initial ``U`` (``out x r``, orthonormal columns).
        vt: Initial ``V^T`` (``r x in``, orthonormal rows).
    """

    def __init__(self, base: nn.Linear, r: int, scale: float, s_mode: str, dropout: float,
                 u: Tensor, vt: Tensor) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scale, self.s_mode = r, scale, s_mode
        device = base.weight.device
        base.requires_grad_(False)
        self.stella_V = nn.Linear(self.in_features, r, bias=False, device=device,
                                  dtype=torch.float32)
        self.stella_U = nn.Linear(r, self.out_features, bias=False, device=device,
                                  dtype=torch.float32)
        eye = torch.ones(r) if s_mode == "diagonal" else torch.eye(r)
        self.stella_S = nn.Parameter(eye.to(device=device, dtype=torch.float32))
        self.stella_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            self.stella_U.weight.copy_(u)
            self.stella_V.weight.copy_(vt)
        self.merged = False

    # HF code sometimes reads `layer.weight` (dtype checks, tied weights): forward to the base.
    @property
    def weight(self) -> Tensor:
        """The frozen base weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The frozen base bias."""
        return self.base_layer.bias

    def _apply_s(self, h: Tensor) -> Tensor:
        # Row form of U S V^T x is x^T V S^T U^T: h = x V, then h S^T.
        if self.s_mode == "diagonal":
            return h * self.stella_S
        return h @ self.stella_S.transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.stella_V(self.stella_dropout(x).to(self.stella_V.weight.dtype))
        delta = self.stella_U(self._apply_s(h))
        return out + (self.scale * delta).to(out.dtype)

    @torch.no_grad()
    def lora_factors(self) -> tuple[Tensor, Tensor]:
        r"""``(B, A) = (s U S, V^T)``, fp32, so that :math:`B A = s\, U S V^T`."""
        u, s = self.stella_U.weight.float(), self.stella_S.float()
        b = u * s if self.s_mode == "diagonal" else u @ s
        return self.scale * b, self.stella_V.weight.float().clone()

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        r""":math:`\Delta W = s\, U S V^T` (``out x in``, fp32)."""
        b, a = self.lora_factors()
        return b @ a

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (inference); the adapter path is then skipped."""
        if self.merged:
            raise RuntimeError("StellaLinear is already merged")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (exact up to rounding)."""
        if not self.merged:
            raise RuntimeError("StellaLinear is not merged")
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, s_mode={self.s_mode}, merged={self.merged}")


@dataclass
class StellaConfig(AdapterConfig):
    r"""StelLA adapter: every targeted Linear gets :math:`s\, U S V^T` (:class:`StellaLinear`).

    Declaration (:mod:`app.adapters.contract`): ``U`` and ``V`` are constrained to the Stiefel
    manifold by :class:`app.callbacks.stella.StellaCallback` (Riemannian gradient before the
    optimizer step, projection and retraction after it; a fit without it is warned at
    start-up) and kept out of weight decay, with ``S`` (as the public code's
    optimizer groups do); single device or DDP only (the
    retraction needs whole factors); fp32 master weights (``32-true`` or ``bf16-mixed``);
    the rank is ``r``; the export is a standard PEFT LoRA adapter (:meth:`export`).

    Args:
        r: Rank of the update (``1 <= r <= min(in, out)`` of every targeted layer).
        alpha: Scale numerator: ``s = alpha / r`` (StelLA's recipe: ``alpha = 2 r``).
        target_modules: Module names (a name or a ``.``-suffix, PEFT's list matching);
            ``None``: PEFT's LoRA default for the model type (query/value projections).
        s_mode: ``"full"``: ``S`` is a free ``r x r`` matrix; ``"diagonal"``: a vector (the
            paper's LLaMA recipe).
        init: ``"orthonormal"``: ``U``, ``V`` from QR of a seeded Gaussian; ``"top"`` /
            ``"bottom"``: the top / bottom ``r`` left and right singular vectors of ``W``.
            ``S = I`` in every case.
        dropout: Dropout probability on the adapter input.
        seed: Seed of the orthonormal init (its own generator, so every data-parallel rank
            and every rebuild draws the same factors).
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None
    s_mode: Literal["full", "diagonal"] = "full"
    init: Literal["orthonormal", "top", "bottom"] = "orthonormal"
    dropout: float = 0.0
    seed: int = 0

    spec: ClassVar[MethodSpec] = MethodSpec(
        name="StelLA", rank_field="adapter.r", strategies=ROWWISE,
        strategy_owner="StellaCallback", strategy_reason=ROWWISE_REASON,
        precisions=FP32_MASTER_PRECISIONS, precision_owner="StellaCallback",
        no_decay=(_U, _V, _S),  # S too, as in the public StelLA code
        state_markers=("stella_",), callbacks=(_CALLBACK,))

    def constraint(self) -> Constraint:
        """``U`` and ``V`` on the Stiefel manifold, kept there exactly by the retraction."""
        return Constraint(factors=(_U, _V), manifold="stiefel", callback=_CALLBACK)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{_OPTION}.r must be a positive integer, got {self.r!r}")
        if not is_positive_number(self.alpha):
            raise ConfigError(f"{_OPTION}.alpha must be a positive number, got {self.alpha!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(
                    isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"{_OPTION}.target_modules must be null or a non-empty list "
                                  f"of module names, got {self.target_modules!r}")
        if self.s_mode not in ("full", "diagonal"):
            raise ConfigError(f"{_OPTION}.s_mode must be 'full' or 'diagonal', "
                              f"got {self.s_mode!r}")
        if self.init not in ("orthonormal", "top", "bottom"):
            raise ConfigError(f"{_OPTION}.init must be 'orthonormal', 'top' or 'bottom', "
                              f"got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{_OPTION}.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{_OPTION}.seed must be an integer, got {self.seed!r}")

    @property
    def scale(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.r

    def target_patterns(self) -> list[str] | None:
        return self.target_modules

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """``target_modules``, else PEFT's default for ``model.config.model_type``, else the
        model's query / value projections (:mod:`app.adapters.targets`)."""
        if self.target_modules is not None:
            return list(self.target_modules)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        found = peft_default_targets(model_type) or default_query_value_targets(model)
        if found is None:
            raise ConfigError(f"{_OPTION}.target_modules is null but PEFT has no default "
                              f"targets for model type {model_type!r}; list the modules")
        return found

    # -- building -------------------------------------------------------------------------
    def _initial_factors(self, base: nn.Linear, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        out_f, in_f = base.out_features, base.in_features
        if self.init == "orthonormal":
            u = random_orthonormal(out_f, self.r, gen)
            v = random_orthonormal(in_f, self.r, gen)
            return u, v.T
        p, _, qh = torch.linalg.svd(base.weight.detach().float().cpu(), full_matrices=False)
        k = p.shape[1]
        cols = slice(0, self.r) if self.init == "top" else slice(k - self.r, k)
        return p[:, cols], qh[cols]

    def apply(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        """Freeze ``model``, wrap every target in :class:`StellaLinear`, train the heads.

        Targets inside a head module are skipped (heads are trained in full). Nothing is
        attached to the model: checkpoints find the layers by ``spec.state_markers``, the
        export finds the heads again with :func:`app.adapters.head_module_names`.

        Raises:
            ConfigError: If the targets match nothing, match a module that is not an
                ``nn.Linear``, or ``r`` exceeds a layer's ``min(in, out)``.
        """
        targets = self.resolve_targets(model)
        heads = list(head_modules)
        model.requires_grad_(False)
        names = [n for n, _ in model.named_modules() if n
                 and any(matches_target(n, t) for t in targets)
                 and not any(n == h or n.startswith(h + ".") for h in heads)]
        if not names:
            raise ConfigError(f"{_OPTION}.target_modules={targets} match no module of "
                              f"{type(model).__name__} outside the heads {heads}")
        layers: list[tuple[str, nn.Linear]] = []
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"{_OPTION}.target_modules: {name} is a "
                                  f"{type(module).__name__}, StelLA wraps nn.Linear only")
            if self.r > min(module.in_features, module.out_features):
                raise ConfigError(
                    f"{_OPTION}.r={self.r} exceeds layer {name} (Linear in={module.in_features}"
                    f", out={module.out_features}, weight {tuple(module.weight.shape)}): "
                    f"U and V need r <= min(in, out) = "
                    f"{min(module.in_features, module.out_features)}")
            layers.append((name, module))
        gen = torch.Generator().manual_seed(self.seed)
        for name, module in layers:
            u, vt = self._initial_factors(module, gen)
            wrapped = StellaLinear(module, self.r, self.scale, self.s_mode, self.dropout, u, vt)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
        return model

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: str | Path, base_path: str) -> None:
        r"""Write ``model``'s adapter as a standard PEFT LoRA adapter plus ``config.json``.

        Each :class:`StellaLinear` at ``path`` becomes ``lora_B = s U S`` and ``lora_A = V^T``
        (:math:`B A = s\, U S V^T`) in a ``LoraConfig(r, lora_alpha=r)`` (PEFT scaling 1);
        the head modules are stored as PEFT ``modules_to_save``. Load with
        ``PeftModel.from_pretrained(AutoModelFor...from_pretrained(base_path, config=folder),
        folder)``.

        Args:
            model: A model prepared by :meth:`apply` (not merged).
            folder: Output folder (created if needed).
            base_path: The base checkpoint, recorded as ``base_model_name_or_path``.
        """
        from peft import LoraConfig
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, StellaLinear)}
        if not layers:
            raise ValueError("export: the model has no StellaLinear layers")
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise RuntimeError(f"export: unmerge the StelLA layers first ({merged[:3]})")
        heads = head_module_names(model)
        prefix = "base_model.model."
        tensors: dict[str, Tensor] = {}
        for name, layer in layers.items():
            b, a = layer.lora_factors()
            tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
        for head in heads:
            for key, value in model.get_submodule(head).state_dict().items():
                tensors[f"{prefix}{head}.{key}"] = value.detach().clone().contiguous()
        config = LoraConfig(
            r=self.r, lora_alpha=self.r, lora_dropout=self.dropout, bias="none",
            target_modules=sorted(layers), modules_to_save=heads or None,
            base_model_name_or_path=base_path,
        )
        config.save_pretrained(str(folder))
        save_file({k: v.cpu() for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        hf_config = getattr(model, "config", None)
        if hf_config is not None:
            # The base checkpoint's config names its own class (often the bare encoder).
            hf_config.architectures = [type(model).__name__]
            hf_config.save_pretrained(str(folder))
