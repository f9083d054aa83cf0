r"""GaLore's projector: the gradient's top-``r`` singular vectors on its short side.

Two ways to get them, one rule to turn them into ``P`` (:func:`top_singular`):

* :func:`svd_projection` (one process / DDP): ``torch.linalg.svd`` of the whole gradient, as in
  the paper, in float64;
* :func:`gram_projection` (FSDP2, the weight sharded along its long side): the short-side Gram
  matrix (``G^T G`` for ``p >= q``, ``G G^T`` otherwise) of the local rows, summed over the
  ranks by one all-reduce of ``min(p, q)^2`` float64 values, and its replicated ``eigh``.

Where the spectrum separates the vectors both give the same ``P`` to ~1e-7 (tested).

**Null directions.** The singular vectors of ``sigma_i <= null_rtol * sigma_1`` are not
defined by the gradient: there ``G`` is zero up to rounding, and the vectors that SVD or
``eigh`` return depend on the rounding (SVD against Gram, one process against the
reduction order of two). Adam divides the projected gradient by its own running magnitude,
so a column of ``R`` that is pure rounding noise becomes a full-size step in a direction
the gradient never had. The rule: those columns of ``P`` (rows for ``p >= q``) are zero, so
``R``, the moments and the update are exactly zero there until a refresh finds the
direction in the gradient. The effective rank is the number of ``sigma_i > null_rtol *
sigma_1`` among the top ``r`` (``r`` whenever ``sigma_r > null_rtol * sigma_1``); a zero
gradient gives ``P = 0``. ``null_rtol = 0`` keeps every vector (the paper's code). Measured
on the tiny test model (``tests/test_fsdp2.py``, first refresh): the BERT pooler's gradient
has ``sigma_2 / sigma_1 = 8e-7`` (numerically rank 1), the second layer's feed-forward
weights ``sigma_8 / sigma_1 = 1e-7 to 2e-7``, and no weight has a gap at ``r = 8``
(``(sigma_8 - sigma_9) / sigma_1`` between 5e-8 and 3e-4); one process and two FSDP2 ranks
differ in the gradient by 1e-7 to 1e-6 relative (largest entry), so without the rule their
projectors differed by up to 2.4 (Frobenius norm of the ``P^T P`` difference).

Each kept vector is sign-fixed (:func:`sign_fixed`: largest-magnitude entry positive), so
the kept moments mean the same in the next subspace on every rank and in every path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["NULL_RTOL", "gram_projection", "sign_fixed", "svd_projection", "top_singular"]

NULL_RTOL = 1e-3
"""Default ``null_rtol``: ``sigma_i <= 1e-3 sigma_1`` counts as zero (see the module docstring).
The gradients of two reduction orders differ by ~1e-6 relative in fp32 (measured on the tiny
test model); a direction at ``1e-3 sigma_1`` carries ~1e3 times its rounding, so its Adam step
is defined to ~1e-3 of itself."""


def sign_fixed(vectors: Tensor, dim: int) -> Tensor:
    """Flip each vector (slices along ``dim``) so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(torch.gather(vectors, dim, idx))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def top_singular(vectors: Tensor, sigma: Tensor, rank: int, null_rtol: float) -> Tensor:
    """The first ``rank`` columns of ``vectors``, sign-fixed, zero where ``sigma`` is null.

    Args:
        vectors: Short-side singular vectors as columns, ``sigma`` descending (float64).
        sigma: Their singular values, descending.
        rank: ``r``.
        null_rtol: Columns with ``sigma_i <= null_rtol * sigma_1`` become zero (all of them
            for a zero gradient).

    Returns:
        ``n x r`` float32 columns: orthonormal where kept, zero elsewhere.
    """
    top, values = vectors[:, :rank], sigma[:rank]
    kept = values > null_rtol * values[0] if values[0] > 0 else torch.zeros_like(values,
                                                                                  dtype=bool)
    return (sign_fixed(top, dim=0) * kept).to(torch.float32)


def svd_projection(grad: Tensor, rank: int, null_rtol: float = NULL_RTOL) -> Tensor:
    """GaLore's projector from the SVD of the whole gradient (float64).

    Returns:
        ``P``: the top-``r`` right singular vectors as rows (``r x q``) if ``p >= q``, else the
        left ones as columns (``p x r``); :func:`top_singular` for signs and null directions.
    """
    u, sigma, vh = torch.linalg.svd(grad.to(torch.float64), full_matrices=False)
    tall = grad.shape[0] >= grad.shape[1]
    top = top_singular(vh.T if tall else u, sigma, rank, null_rtol)
    return top.T.contiguous() if tall else top.contiguous()


def gram_projection(grad_local: Tensor, rank: int, tall: bool, reduce: Any,
                    null_rtol: float = NULL_RTOL) -> Tensor:
    """GaLore's projector from the all-reduced short-side Gram matrix of the local gradient.

    Args:
        grad_local: This rank's rows (``tall``) or columns of the gradient.
        rank: ``r``.
        tall: Whether the global weight has ``p >= q``.
        reduce: In-place sum over the ranks (``None`` on one device): called once, on the
            ``min(p, q) x min(p, q)`` float64 Gram matrix.
        null_rtol: See :func:`top_singular`.

    Returns:
        ``P`` as :func:`svd_projection` returns it for the whole gradient.
    """
    g = grad_local.to(torch.float64)  # fp32 Gram entries would drown sigma_i << sigma_1
    gram = g.T @ g if tall else g @ g.T
    if reduce is not None:
        reduce(gram)
    eigvals, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    sigma = eigvals.flip(-1).clamp_min(0.0).sqrt()
    top = top_singular(vecs.flip(-1), sigma, rank, null_rtol)
    return top.T.contiguous() if tall else top.contiguous()
