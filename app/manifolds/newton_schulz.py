r"""Matmul-only inverse square root for the polar retraction: Newton-Schulz with a proven bound.

For a symmetric positive definite ``r x r`` Gram matrix :math:`G = Y^T Y` the iteration

.. math::

    W_0 = I, \qquad W_{k+1} = \tfrac12 W_k (3I - G W_k^2)

keeps every :math:`W_k` a polynomial in :math:`G` (so all of them commute with :math:`G`) and
maps each eigenvalue :math:`t = \sigma^2` of :math:`G` through the scalar Newton-Schulz step of
the singular values of :math:`Y_k = Y W_k`: :math:`\sigma \leftarrow \sigma (3 - \sigma^2) / 2`.

**Bound.** Write :math:`\delta = 1 - \sigma^2`. One step gives
:math:`1 - \sigma'^2 = \delta^2 (3 + \delta) / 4`, so for :math:`|\delta| < 1`:
:math:`0 \le \delta' \le \delta^2` (and :math:`\sigma' > 0`). With
:math:`\delta_0 = \lVert G - I \rVert_2 \le \lVert G - I \rVert_F \le \rho < 1`,

.. math::

    \lVert Y_K^T Y_K - I \rVert_2 = \lVert W_K G W_K - I \rVert_2 \le \rho^{2^K}

(quadratic convergence), and the limit is :math:`W_\infty = G^{-1/2}`, i.e.
:math:`Y_\infty = Y (Y^T Y)^{-1/2}`, the polar factor itself, not merely some orthonormal
matrix. :func:`newton_schulz_steps` picks the smallest ``K`` with :math:`\rho^{2^K} \le`
``tol``: at the default :math:`\rho = 1/2`, ``tol = 1e-7`` it is ``K = 5`` (bound
``2.3e-10``; float32 rounding, about ``r * 6e-8``, dominates). The matrices whose
:math:`\lVert G - I\rVert_F` exceeds :math:`\rho` (a huge step, factors that left the
manifold, a non-finite ``G``) are flagged on the device and take the eigendecomposition form
(:func:`app.manifolds.stiefel.inverse_sqrt_psd`) instead.

A StelLA step moves :math:`\lVert G - I \rVert` by about :math:`\lVert \xi \rVert^2`
(``1e-6`` to ``1e-3`` at the paper's learning rates), far inside the bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from app.manifolds.stiefel import inverse_sqrt_psd

__all__ = ["RADIUS", "TOL", "apply_fallback", "inverse_sqrt_newton_schulz",
           "newton_schulz_steps"]

#: Largest ``||G - I||_F`` the iteration is used at (its proof needs ``< 1``).
RADIUS = 0.5
#: Bound on ``||W G W - I||_2`` in exact arithmetic after the chosen number of steps.
TOL = 1e-7


def newton_schulz_steps(radius: float = RADIUS, tol: float = TOL) -> int:
    """Smallest ``K`` with ``radius ** (2 ** K) <= tol`` (``0 < radius < 1``, ``0 < tol < 1``).

    Raises:
        ValueError: If ``radius`` or ``tol`` is outside ``(0, 1)``.
    """
    if not 0.0 < radius < 1.0:
        raise ValueError(f"radius must be in (0, 1), got {radius}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    return max(0, math.ceil(math.log2(math.log(tol) / math.log(radius))))


def inverse_sqrt_newton_schulz(g: Tensor, radius: float = RADIUS, tol: float = TOL
                               ) -> tuple[Tensor, Tensor]:
    r""":math:`G^{-1/2}` of symmetric ``(..., r, r)`` Gram matrices by matmuls only.

    Runs :func:`newton_schulz_steps` iterations on every matrix in ``g``'s dtype (float32 for
    float32 factors); no host read. The eigendecomposition fallback is *not* applied here:
    the caller gets the device-side flag of the matrices outside the bound and decides (see
    :func:`app.manifolds.fused.polar_coefficients`).

    Args:
        g: Symmetric ``(..., r, r)``.
        radius: The bound's radius on :math:`\lVert G - I\rVert_F`.
        tol: Target of the bound.

    Returns:
        ``(w, outside)``: the iterates ``(..., r, r)`` and a boolean ``(...)`` tensor, true
        where :math:`\lVert G - I\rVert_F \ge` ``radius`` or not finite (``w`` meaningless
        there).
    """
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    g = 0.5 * (g + g.transpose(-1, -2))
    dev = torch.linalg.matrix_norm(g - eye)
    outside = ~(dev < radius)  # NaN compares false: flagged
    w = torch.broadcast_to(eye, g.shape)
    three = 3.0 * eye
    for _ in range(newton_schulz_steps(radius, tol)):
        w = 0.5 * (w @ (three - g @ (w @ w)))
    return w, outside


def apply_fallback(g: Tensor, w: Tensor, outside: Tensor) -> Tensor:
    """``w`` with the flagged matrices replaced by the float64 eigendecomposition form.

    Reads one boolean from the device (``outside.any()``) so the eigendecomposition runs
    only when a matrix is outside the bound, and then only on those matrices.
    """
    if not bool(outside.any()):  # the one documented host read of the Newton-Schulz form
        return w
    w = w.clone()
    w[outside] = inverse_sqrt_psd(g[outside].to(torch.float64)).to(w.dtype)
    return w
