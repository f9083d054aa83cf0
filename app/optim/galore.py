r"""GaLore and GaRare: AdamW with Adam moments kept in a rank-``r`` projection of the gradient.

For a targeted weight ``W`` (``p x q``, p rows, q cols) with gradient ``G`` and rank ``r``:

* ``p >= q``: ``R = G P^T`` with ``P`` (``r x q``); back-projection ``D P``.
* ``p < q``:  ``R = P^T G`` with ``P`` (``p x r``); back-projection ``P D``.

Adam runs on ``R`` (moments of shape ``max(p, q) x r`` or transposed), ``D`` is its
bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``, and

.. math::
    W \leftarrow W - \eta\, s\, \mathrm{back}(D), \qquad W \leftarrow W - \eta\, \lambda\, W

(update, then decoupled weight decay; ``s`` = ``scale``). Per matrix the state is
``2 r max(p, q)`` moment entries, plus the ``r min(p, q)`` projector for GaLore; GaRare stores no
projector. All projected math and state are float32 whatever the parameter dtype.

* **GaLore** (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection", ICML 2024): ``P`` holds the top-``r`` right (``p >= q``) or left (``p < q``)
  singular vectors of ``G``, recomputed every ``update_proj_gap`` (T) steps and stored in the
  state as a tensor (``"projector"``); :mod:`app.optim.subspace`. Deviations from the paper's
  code, both for a ``P`` that every path and process count computes alike: the SVD runs in
  float64 and each vector is sign-fixed (largest-magnitude entry positive); singular values
  ``<= null_rtol * sigma_1`` (default 1e-3; 0 = the paper's code) count as zero and their
  vectors, which only rounding defines, are zero rows / columns of ``P``, so Adam never
  scales rounding noise into a full-size step (a rank-deficient gradient, such as the
  tests' tiny BERT pooler's, trains in fewer than ``r`` directions until a refresh finds more).
* **GaRare** (Liu et al., "On the Optimization Landscape of Low Rank Adaptation Methods for
  LLMs", ICLR 2025): ``P`` is random, regenerated at every step from a ``torch.Generator``
  seeded by ``(seed, zlib.crc32(parameter name), step // T)`` and never stored, so every
  data-parallel rank and a resumed run see the same ``P``.

GaRare normalisation (option ``projection_norm``): ``"gaussian"`` (default, the paper's):
``P`` has i.i.d. ``N(0, 1/r)`` entries, so ``E[P^T P] = I`` (resp. ``E[P P^T] = I``) and the
back-projected step ``back(D)`` is about ``sqrt(min(p, q) / r)`` times larger than with an
orthonormal ``P`` (about 7x for MiniLM's 384-wide weights at r = 8): with Adam in the
projected space ``D`` has entries of order one whatever the gradient scale, so ``P``'s norm
sets the step size, and the paper's ``scale`` / ``lr`` are meant for this ``P``.
``"orthonormal"``: the same Gaussian draw orthonormalised by QR (sign-fixed, Haar on the
Stiefel manifold; same subspace), so ``||back(D)||_F = ||D||_F`` as with GaLore's singular
vectors; equivalent to ``"gaussian"`` with ``scale`` multiplied by ``sqrt(min(p, q) / r)``
(per weight, roughly).

Moments at a projection change (option ``moments_on_proj_change``): ``"keep"`` (default, the
public GaLore code that GaRare reuses: the moments of the old subspace carry on in the new
coordinates) or ``"reset"`` (zeroed at every change, steps ``T, 2T, ...``, with Adam's bias
correction restarted, so the first step in a new subspace is a sign-like step as at step 1).
For GaRare consecutive subspaces are independent random draws, so kept moments are noise in
the new coordinates; a toy least-squares problem with T = 10 reached loss 10.87 with resets
against 11.25 without.

Non-target parameters (not 2-D, not matched, or embeddings by default) get plain AdamW,
numerically identical to ``torch.optim.AdamW`` (single-tensor path, decay before the update).
The state holds tensors only (``step`` as a float32 CPU scalar tensor like torch's Adam), so
``state_dict`` survives ``torch.load(weights_only=True)``. Under FSDP2 (``DTensor`` weights
sharded along their long side) the projection runs on local rows: see
:mod:`app.optim.sharded_projection` (no collective per step; GaLore's refresh all-reduces the
short-side Gram matrix, ``8 min(p, q)^2`` bytes per targeted weight every T steps, and
reproduces a one-process run: ``tests/test_fsdp2.py``).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from torch.optim.optimizer import ParamsT

from app.adapters.contract import ALL_STRATEGIES, MethodSpec
from app.optim.projected import ProjectedAdamW, projection_seed, random_projection
from app.optim.subspace import NULL_RTOL

__all__ = ["GaLoreAdamW", "GaRareAdamW", "projection_seed", "random_projection"]


def _spec(cls_name: str) -> MethodSpec:
    """GaLore's / GaRare's declaration (:mod:`app.adapters.contract`): the rank is the
    optimizer's, the weights are full (``adapter: null``); FSDP1, a plain
    ``ModelParallelStrategy`` and DeepSpeed are refused (FSDP2 runs the projection on local
    rows: :mod:`app.optim.sharded_projection`)."""
    return MethodSpec(
        name="GaLore/GaRare", rank_field="optimizer.rank",
        strategies=ALL_STRATEGIES - {"fsdp", "model_parallel", "deepspeed"},
        strategy_owner=f"model.init_args.optimizer: {cls_name}",
        strategy_reason="it projects each targeted weight's gradient matrix by rows or "
                        "columns, and this strategy flattens or splits them arbitrarily; use "
                        "FSDP2 (configs/strategy/fsdp2.yaml: weights sharded along their long "
                        "side) or trainer.strategy=ddp (configs/strategy/ddp.yaml, every rank "
                        "keeps full weights)",
        full_weights=True)


class GaLoreAdamW(ProjectedAdamW):
    r"""GaLore: AdamW whose moments live in a periodically refreshed SVD gradient subspace.

    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    ICML 2024. For a targeted ``p x q`` weight, ``R = G P^T`` (``p >= q``, ``P`` = top-``r``
    right singular vectors, ``r x q``) or ``R = P^T G`` (``p < q``, left vectors, ``p x r``);
    ``W -= lr * scale * back(adam(R))`` then ``W -= lr * weight_decay * W``. ``P`` is
    recomputed from the current gradient every ``update_proj_gap`` steps (steps 0, T, 2T, ...)
    and stored in the state under ``"projector"``; moments are not rotated when it changes.
    Null singular directions (``null_rtol``) are zero in ``P``.

    Args:
        params: Named parameters (``model.named_parameters()``) or param groups whose
            ``"params"`` are ``(name, tensor)`` pairs; plain tensors only with
            ``target_modules=None``. Groups may override every option below except
            ``target_modules``.
        lr: Learning rate.
        betas: Adam coefficients ``(beta1, beta2)``.
        eps: Adam denominator epsilon (added after bias correction, as in torch AdamW).
        weight_decay: Decoupled weight decay coefficient.
        target_modules: Module-name components (dotted sequences allowed, e.g. ``"query"`` or
            ``"attention.output.dense"``) selecting the 2-D weights to project; ``None``
            projects every 2-D parameter except embeddings (names with a component containing
            ``"embed"``, or ``wte`` / ``wpe``). Others get plain AdamW.
        rank: Projection rank ``r`` (1 <= r <= min(p, q) of every targeted weight).
        update_proj_gap: ``T``, steps between SVD refreshes.
        scale: ``s``, multiplier of the back-projected update (paper: 0.25 pre-training,
            4 on GLUE).
        moments_on_proj_change: ``"keep"`` (the paper's code) or ``"reset"`` the moments when
            ``P`` is recomputed (module docstring).
        null_rtol: Singular values at or below ``null_rtol * sigma_1`` count as zero: their
            rows (columns) of ``P`` are zero (:mod:`app.optim.subspace`); 0 keeps every vector.
    """

    projection: ClassVar[Literal["svd", "random"]] = "svd"
    spec: ClassVar[MethodSpec] = _spec("GaLoreAdamW")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_modules: list[str] | None = None,
        rank: int = 8,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        moments_on_proj_change: Literal["keep", "reset"] = "keep",
        null_rtol: float = NULL_RTOL,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, target_modules, rank,
                         update_proj_gap, scale, seed=0,
                         moments_on_proj_change=moments_on_proj_change, null_rtol=null_rtol)


class GaRareAdamW(ProjectedAdamW):
    r"""GaRare: GaLore with a random projection regenerated every step instead of the SVD.

    Liu et al., "On the Optimization Landscape of Low Rank Adaptation Methods for LLMs",
    ICLR 2025. Same update as :class:`GaLoreAdamW`, but ``P`` is a Gaussian (``N(0, 1/r)``
    entries by default, or QR-orthonormalised) drawn from a ``torch.Generator`` seeded by
    :func:`projection_seed` ``(seed, name, step // update_proj_gap)`` (see
    :func:`random_projection`); it is never stored, so the state is ``2 r max(p, q)`` floats
    per targeted ``p x q`` weight plus a step counter, and every rank / resumed run rebuilds
    the same ``P``. See the module docstring for the normalisation choice.

    Args:
        params: As in :class:`GaLoreAdamW`; names enter the seed (unnamed parameters are
            called ``"param_groups.<group>.<index>"``).
        lr: Learning rate.
        betas: Adam coefficients ``(beta1, beta2)``.
        eps: Adam denominator epsilon.
        weight_decay: Decoupled weight decay coefficient.
        target_modules: As in :class:`GaLoreAdamW`.
        rank: Projection rank ``r``.
        update_proj_gap: ``T``, steps during which the same ``P`` is used.
        scale: Multiplier of the back-projected update.
        seed: Run seed of the projections (saved in the param groups: a resumed run keeps it).
        projection_norm: ``"gaussian"`` (the paper's ``N(0, 1/r)`` entries) or
            ``"orthonormal"`` (QR of the same draw); see the module docstring.
        moments_on_proj_change: ``"keep"`` (the paper's code) or ``"reset"`` the moments at
            every projection change.
    """

    projection: ClassVar[Literal["svd", "random"]] = "random"
    spec: ClassVar[MethodSpec] = _spec("GaRareAdamW")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_modules: list[str] | None = None,
        rank: int = 8,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        seed: int = 0,
        projection_norm: Literal["orthonormal", "gaussian"] = "gaussian",
        moments_on_proj_change: Literal["keep", "reset"] = "keep",
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, target_modules, rank,
                         update_proj_gap, scale, seed=seed,
                         projection_norm=projection_norm,
                         moments_on_proj_change=moments_on_proj_change)
