"""Oblique manifold: tall ``n x p`` matrices whose every column has unit norm.

The product of ``p`` unit spheres ``S^{n-1}``, used by Manifold-LoRA's "sphere" variant.
Same conventions as :mod:`app.manifolds.stiefel`: batched ``(..., n, p)`` inputs, math in
at least float32, results in the computation dtype.

References:
    P.-A. Absil, K. Gallivan, "Joint diagonalization on the oblique manifold for
    independent component analysis", ICASSP 2006.
    P. Ablin, G. Peyré, "Fast and accurate optimization on the orthogonal manifold
    without retraction", AISTATS 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.manifolds.stiefel import compute_dtype

__all__ = ["drift", "landing_step", "project_tangent", "retract"]


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


@torch.no_grad()
def project_tangent(x: Tensor, z: Tensor) -> Tensor:
    r"""Tangent projection, column by column: :math:`z_j - (x_j^T z_j)\, x_j`.

    Args:
        x: Points ``(..., n, p)`` with unit-norm columns.
        z: Ambient vectors ``(..., n, p)``.

    Returns:
        Tangent vectors (``x_j^T z_j = 0``) in the computation dtype.
    """
    x, z = _upcast(x, z)
    return z - (x * z).sum(dim=-2, keepdim=True) * x


@torch.no_grad()
def retract(x: Tensor, z: Tensor) -> Tensor:
    r"""Normalisation retraction: :math:`R_x(z)_j = (x_j + z_j) / \|x_j + z_j\|`.

    Args:
        x: Points ``(..., n, p)``.
        z: Tangent vectors ``(..., n, p)``.

    Returns:
        Points with unit-norm columns in the computation dtype.
    """
    x, z = _upcast(x, z)
    y = x + z
    norm = torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    return y / norm.clamp_min(torch.finfo(y.dtype).tiny)


@torch.no_grad()
def landing_step(x: Tensor, d: Tensor, mu: float = 1 / 3) -> Tensor:
    r"""Retraction-free landing update, column by column.

    .. math::

        x_j \leftarrow x_j + P_{x_j}(d_j) - \mu\, x_j (\|x_j\|^2 - 1)

    where :math:`x_j (\|x_j\|^2 - 1)` is the gradient of
    :math:`\tfrac14 (\|x_j\|^2 - 1)^2` (Ablin & Peyré 2022 applied to each sphere; the
    Manifold-LoRA sphere variant). Near the manifold the norm error shrinks by
    ``|1 - 2 mu|`` per step when ``d = 0``.

    Args:
        x: Current points ``(..., n, p)``, columns only approximately unit norm.
        d: Proposed steps ``(..., n, p)``.
        mu: Penalty step size.

    Returns:
        Updated points in the computation dtype.
    """
    x, d = _upcast(x, d)
    sq = (x * x).sum(dim=-2, keepdim=True)
    return x + project_tangent(x, d) - mu * x * (sq - 1.0)


@torch.no_grad()
def drift(x: Tensor) -> Tensor:
    r"""Column-norm deviation :math:`\|\operatorname{diag}(X^T X) - 1\|_2` per matrix.

    This is the diagonal part of the Stiefel drift :math:`\|X^T X - I\|_F`; the
    off-diagonal entries are unconstrained on the oblique manifold.

    Args:
        x: Matrices ``(..., n, p)``.

    Returns:
        Deviation of shape ``(...)`` in the computation dtype.
    """
    (x,) = _upcast(x)
    sq = (x * x).sum(dim=-2)
    return torch.linalg.vector_norm(sq - 1.0, dim=-1)
