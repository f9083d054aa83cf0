"""The engine shared by GaLore and GaRare (:mod:`app.optim.galore`): AdamW whose moments live
in a rank-``r`` projection of each targeted weight's gradient, and the projections themselves.

See :mod:`app.optim.galore` for the update, the projections and the options. The state holds
tensors only; under FSDP2 the projection runs on local rows
(:mod:`app.optim.sharded_projection`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from app.adapters.contract import MethodSpec
from app.adapters.targets import matches_component
from app.draws import random_orthonormal, seed_of
from app.dtensor import is_dtensor
from app.optim import sharded_projection, subspace

__all__ = ["ProjectedAdamW", "projection_seed", "random_projection"]

_EMBEDDING_NAMES = ("wte", "wpe")
_FP32_KEYS = ("exp_avg", "exp_avg_sq", "projector")


def projection_seed(seed: int, name: str, block: int) -> int:
    """Deterministic generator seed for GaRare's projection of one parameter in one block.

    Args:
        seed: The run seed.
        name: The parameter's name (hashed with ``zlib.crc32``, never Python's ``hash``).
        block: ``step // update_proj_gap``.

    Returns:
        A 63-bit seed, a splitmix64 mix of ``(seed, crc32(name), block)``.
    """
    return seed_of(seed, name, block)


def random_projection(
    name: str,
    seed: int,
    block: int,
    shape: tuple[int, int],
    rank: int,
    device: torch.device | str | None = None,
    normalisation: Literal["orthonormal", "gaussian"] = "orthonormal",
) -> Tensor:
    """GaRare's projector for a ``p x q`` weight, float32: a seeded Gaussian draw, scaled to
    ``N(0, 1/r)`` entries (``"gaussian"``) or orthonormalised by QR (``"orthonormal"``); both
    span the same subspace.

    Args:
        name: Parameter name.
        seed: Run seed.
        block: ``step // update_proj_gap``.
        shape: ``(p, q)`` of the weight.
        rank: ``r``.
        device: Where to draw it (CPU and CUDA generators give different numbers, so a run
            must be resumed on the same device type).
        normalisation: ``"orthonormal"`` or ``"gaussian"`` (see the module docstring).

    Returns:
        ``P`` of shape ``(r, q)`` (rows orthonormal, or ``N(0, 1/r)`` entries) if ``p >= q``,
        else ``(p, r)``.
    """
    p, q = shape
    dim = min(q, p)
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(projection_seed(seed, name, block))
    if normalisation == "gaussian":
        z = torch.randn(dim, rank, generator=gen, device=device, dtype=torch.float32)
        z = z / math.sqrt(rank)
        return z.T.contiguous() if p >= q else z
    qmat = random_orthonormal(dim, rank, gen, device=device)  # QR of the same draw
    return qmat.T.contiguous() if p >= q else qmat


def _is_embedding(name: str) -> bool:
    parts = name.lower().split(".")
    return any("embed" in part or part in _EMBEDDING_NAMES for part in parts)


def _hyper(group: dict[str, Any]) -> tuple[float, tuple[float, float], float, float]:
    return group["lr"], group["betas"], group["eps"], group["weight_decay"]


class ProjectedAdamW(Optimizer):
    """Shared GaLore / GaRare implementation; use :class:`app.optim.galore.GaLoreAdamW` or
    :class:`app.optim.galore.GaRareAdamW`.

    Subclasses set ``projection`` (``"svd"``: stored, refreshed SVD projector; ``"random"``:
    regenerated seeded projection) and ``spec`` (their method declaration).
    """

    projection: ClassVar[Literal["svd", "random"]]
    spec: ClassVar[MethodSpec]

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        target_modules: list[str] | None,
        rank: int,
        update_proj_gap: int,
        scale: float,
        seed: int,
        projection_norm: Literal["orthonormal", "gaussian"] = "orthonormal",
        moments_on_proj_change: Literal["keep", "reset"] = "keep",
        null_rtol: float = subspace.NULL_RTOL,
    ) -> None:
        for key, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if projection_norm not in ("orthonormal", "gaussian"):
            raise ValueError("projection_norm must be 'gaussian' or 'orthonormal', got "
                             f"{projection_norm!r}")
        if moments_on_proj_change not in ("keep", "reset"):
            raise ValueError("moments_on_proj_change must be 'keep' or 'reset', got "
                             f"{moments_on_proj_change!r}")
        if not 0.0 <= null_rtol < 1.0:
            raise ValueError(f"null_rtol must be in [0, 1), got {null_rtol}")
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        self.target_modules = None if target_modules is None else list(target_modules)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "seed": seed,
            "projection_norm": projection_norm,
            "moments_on_proj_change": moments_on_proj_change,
        }
        if self.projection == "svd":  # GaLore: singular values <= null_rtol * sigma_1 are zero
            defaults["null_rtol"] = null_rtol
        super().__init__(params, defaults)
        if self.target_modules is not None and not any(
            any(g["projected"]) for g in self.param_groups
        ):
            two_d = [n for n, p in self._named(self.param_groups) if p.ndim == 2]
            more = f" (and {len(two_d) - 5} more)" if len(two_d) > 5 else ""
            shown = ", ".join(two_d[:5]) + more
            raise ValueError(
                f"target_modules={self.target_modules} matched no 2-D parameter name as a "
                f"module-name component; 2-D parameters include: {shown or 'none'}"
            )

    @staticmethod
    def _group_names(group: dict[str, Any], index: int) -> list[str]:
        names = group.get("param_names")
        if names is not None:
            return list(names)
        return [f"param_groups.{index}.{i}" for i in range(len(group["params"]))]

    def _named(self, groups: list[dict[str, Any]]) -> list[tuple[str, Tensor]]:
        return [
            pair
            for gi, g in enumerate(groups)
            for pair in zip(self._group_names(g, gi), g["params"], strict=True)
        ]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``) and decide which of its weights to project.

        Raises:
            ValueError: Unnamed parameters with ``target_modules`` set, ``rank`` < 1,
                ``update_proj_gap`` < 1, or ``rank`` above ``min(p, q)`` of a targeted weight.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        rank, gap = group["rank"], group["update_proj_gap"]
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not isinstance(gap, int) or gap < 1:
            raise ValueError(f"update_proj_gap must be an integer >= 1, got {gap!r}")
        named = "param_names" in group
        if self.target_modules is not None and not named:
            raise ValueError(
                "target_modules needs named parameters to select weights: pass "
                "model.named_parameters() (or param groups whose 'params' are (name, tensor) "
                "pairs), or set target_modules=None to project every 2-D parameter"
            )
        flags: list[bool] = []
        for name, p in zip(self._group_names(group, len(self.param_groups) - 1), group["params"],
                           strict=True):
            if p.ndim != 2:
                flags.append(False)
                continue
            if self.target_modules is None:
                flags.append(not (named and _is_embedding(name)))
            else:
                flags.append(matches_component(name, self.target_modules))
            if flags[-1] and rank > min(p.shape):
                raise ValueError(
                    f"rank={rank} exceeds min(p, q)={min(p.shape)} of targeted weight '{name}' "
                    f"with shape {tuple(p.shape)}; lower rank or leave it out of target_modules"
                )
            if flags[-1] and is_dtensor(p):  # FSDP2: sharded along the long side only
                sharded_projection.check_placement(name, p)
        group["projected"] = flags

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping projected moments / projector in float32.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter dtype;
        for projected weights the float32 tensors are restored afterwards.
        """
        keep: list[tuple[Tensor, dict[str, Tensor]]] = []
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            flags = saved.get("projected", [False] * len(saved["params"]))
            for idx, p, projected in zip(saved["params"], group["params"], flags, strict=True):
                st = state_dict["state"].get(idx, {})
                if projected:
                    keep.append((p, {k: st[k] for k in _FP32_KEYS if k in st}))
        super().load_state_dict(state_dict)
        for p, tensors in keep:
            for key, value in tensors.items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: Optional callable re-evaluating the model and returning the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            names = self._group_names(group, gi)
            for name, p, projected in zip(names, group["params"], group["projected"],
                                          strict=True):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if projected:
                    self._projected_step(name, p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _adamw_step(self, p: Tensor, group: dict[str, Any]) -> None:
        """``torch.optim.AdamW``'s single-tensor update, operation for operation."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps, wd = _hyper(group)
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))

    def _projector(self, name: str, p: Tensor, grad: Tensor, step: int,
                   group: dict[str, Any]) -> Tensor:
        gap, rank = group["update_proj_gap"], group["rank"]
        if self.projection == "random":
            return random_projection(name, group["seed"], step // gap, tuple(p.shape), rank,
                                     p.device, group.get("projection_norm", "orthonormal"))
        state = self.state[p]
        if step % gap == 0 or "projector" not in state:
            null_rtol = group.get("null_rtol", subspace.NULL_RTOL)
            if is_dtensor(p):  # FSDP2: short-side Gram matrix, one all-reduce
                state["projector"] = subspace.gram_projection(
                    grad, rank, p.shape[0] >= p.shape[1], sharded_projection.reducer(p),
                    null_rtol)
            else:
                state["projector"] = subspace.svd_projection(grad, rank, null_rtol)
        return state["projector"]

    def _projected_step(self, name: str, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        # FSDP2: the local rows (columns) of a weight sharded along its long side; the
        # projection acts on the short side, whole on every rank (app.optim.sharded_projection)
        grad = sharded_projection.local_view(p.grad).to(torch.float32)
        tall = p.shape[0] >= p.shape[1]
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
        proj = self._projector(name, p, grad, int(state["step"].item()), group)
        low = grad @ proj.T if tall else proj.T @ grad
        if "exp_avg" not in state:
            rank = group["rank"]
            state["exp_avg"] = sharded_projection.as_state(torch.zeros_like(low), p, rank)
            state["exp_avg_sq"] = sharded_projection.as_state(torch.zeros_like(low), p, rank)
        lr, (beta1, beta2), eps, wd = _hyper(group)
        exp_avg = sharded_projection.local_view(state["exp_avg"])
        exp_avg_sq = sharded_projection.local_view(state["exp_avg_sq"])
        done, gap = int(state["step"].item()), group["update_proj_gap"]
        reset = group.get("moments_on_proj_change", "keep") == "reset"
        if reset and done > 0 and done % gap == 0:  # a new subspace starts at this step
            exp_avg.zero_()
            exp_avg_sq.zero_()
        state["step"] += 1
        # Bias correction counts the steps since the moments last started from zero.
        step = done % gap + 1 if reset else state["step"].item()
        exp_avg.lerp_(low, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        direction = (exp_avg / (1 - beta1**step)) / denom
        update = direction @ proj if tall else proj @ direction
        target = sharded_projection.local_view(p)
        target.add_(update.to(p.dtype), alpha=-lr * group["scale"])
        if wd != 0:
            target.mul_(1 - lr * wd)
