"""Stiefel manifold ``St(n, p) = {X in R^{n x p} : X^T X = I_p}``, ``n >= p``.

Pure tensor functions in the style of geoopt's ``manifolds/stiefel.py``. Every function
accepts a batched stack ``(..., n, p)`` of tall matrices, computes in float32 at least
(bf16 / fp16 are upcast to float32, float64 stays float64) and returns the computation
dtype; callers cast back to the parameter dtype.

References:
    A. Edelman, T. Arias, S. Smith, "The Geometry of Algorithms with Orthogonality
    Constraints", SIAM J. Matrix Anal. Appl., 1998.
    P. Ablin, G. Peyré, "Fast and accurate optimization on the orthogonal manifold
    without retraction", AISTATS 2022.
    Z. Li et al., "Subspace Learning in Low-rank Adaptation using Stiefel Manifold"
    (StelLA), NeurIPS 2025.
    "Retraction-free optimization over the Stiefel manifold with application to the LoRA
    fine-tuning" (Manifold-LoRA).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from app.draws import random_orthonormal  # the one sign-fixed QR draw (re-exported)

__all__ = [
    "compute_dtype",
    "drift",
    "inverse_sqrt_psd",
    "landing_step",
    "project_tangent",
    "random_orthonormal",
    "retract_exp",
    "retract_polar",
    "riemannian_grad",
    "skew",
    "sym",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Dtype the manifold math runs in: float64 if any input is float64, else float32.

    Args:
        *tensors: Inputs of one operation.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def sym(m: Tensor) -> Tensor:
    r"""Symmetric part on the last two dims, :math:`\operatorname{sym}(M) = (M + M^T) / 2`.

    Args:
        m: Square matrices ``(..., p, p)``.

    Returns:
        Symmetric part, same shape and dtype.
    """
    return 0.5 * (m + m.transpose(-1, -2))


def skew(m: Tensor) -> Tensor:
    r"""Skew-symmetric part on the last two dims, :math:`\operatorname{skew}(M) = (M - M^T)/2`.

    Args:
        m: Square matrices ``(..., p, p)``.

    Returns:
        Skew-symmetric part, same shape and dtype.
    """
    return 0.5 * (m - m.transpose(-1, -2))


@torch.no_grad()
def project_tangent(x: Tensor, z: Tensor) -> Tensor:
    r"""Orthogonal projection onto the tangent space for the Euclidean (embedded) metric.

    .. math::

        P_X(Z) = Z - X \operatorname{sym}(X^T Z)

    (Edelman et al. 1998, eq. 2.4 with the Euclidean metric; geoopt's
    ``EuclideanStiefel.proju``). For ``X^T X = I`` the result satisfies
    ``sym(X^T P_X(Z)) = 0`` and ``P_X`` is idempotent.

    Args:
        x: Points ``(..., n, p)``.
        z: Ambient vectors ``(..., n, p)``.

    Returns:
        Tangent vectors in the computation dtype.
    """
    x, z = _upcast(x, z)
    return z - x @ sym(x.transpose(-1, -2) @ z)


@torch.no_grad()
def riemannian_grad(x: Tensor, g: Tensor) -> Tensor:
    r"""StelLA's Riemannian gradient from a Euclidean gradient ``G``.

    .. math::

        \operatorname{grad} f(X) = G - X G^T X

    This is the Riemannian gradient for the *canonical* metric
    :math:`\langle \xi, \eta \rangle_X = \operatorname{tr}(\xi^T (I - \tfrac12 X X^T) \eta)`
    (Edelman et al. 1998, eq. 2.53), the choice StelLA makes; it equals geoopt's
    ``CanonicalStiefel.egrad2rgrad``. It is tangent: with ``X^T X = I``,
    ``X^T (G - X G^T X) = X^T G - G^T X`` is skew, so ``sym(X^T grad) = 0``.

    Args:
        x: Points ``(..., n, p)`` with ``X^T X = I``.
        g: Euclidean gradients ``(..., n, p)``.

    Returns:
        Riemannian gradients in the computation dtype.
    """
    x, g = _upcast(x, g)
    return g - x @ (g.transpose(-1, -2) @ x)


@torch.no_grad()
def retract_polar(x: Tensor, z: Tensor, method: Literal["eigh", "svd"] = "eigh") -> Tensor:
    r"""Polar retraction, the orthonormal polar factor of ``Y = X + Z``.

    .. math::

        R_X(Z) = \operatorname{polar}(X + Z) = U V^T = Y (Y^T Y)^{-1/2},
        \quad Y = U \Sigma V^T \text{ (thin SVD)}

    (Absil & Malick 2012, "Projection-like retractions on matrix manifolds"; it is the
    retraction StelLA uses). ``method="eigh"`` forms ``(Y^T Y)^{-1/2}`` from a batched
    ``p x p`` symmetric eigendecomposition, which is cheap for LoRA ranks; eigenvalues
    are clamped at ``eps * max eigenvalue`` so a rank-deficient ``Y`` gives finite output.
    ``method="svd"`` uses the thin SVD. Both agree for full-rank ``Y``.

    Args:
        x: Points ``(..., n, p)``.
        z: Tangent vectors ``(..., n, p)``.
        method: ``"eigh"`` or ``"svd"``.

    Returns:
        Points on the manifold in the computation dtype.

    Raises:
        ValueError: If ``method`` is unknown.
    """
    x, z = _upcast(x, z)
    y = x + z
    if method == "svd":
        u, _, vh = torch.linalg.svd(y, full_matrices=False)
        return u @ vh
    if method != "eigh":
        raise ValueError(f"method must be 'eigh' or 'svd', got {method!r}")
    return y @ inverse_sqrt_psd(y.transpose(-1, -2) @ y)


def inverse_sqrt_psd(g: Tensor) -> Tensor:
    r""":math:`G^{-1/2}` of symmetric positive semi-definite ``(..., p, p)`` matrices.

    From a symmetric eigendecomposition of :math:`(G + G^T) / 2`, eigenvalues clamped at
    ``eps * max eigenvalue`` (at least the dtype's ``tiny``), so a rank-deficient ``G``
    gives a finite result: the polar factor's ``(Y^T Y)^{-1/2}`` here and in
    :mod:`app.manifolds.fused` far from the manifold.
    """
    lam, v = torch.linalg.eigh(0.5 * (g + g.transpose(-1, -2)))
    finfo = torch.finfo(lam.dtype)
    floor = (finfo.eps * lam.amax(dim=-1, keepdim=True)).clamp_min(finfo.tiny)
    return (v * lam.clamp_min(floor).rsqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


@torch.no_grad()
def retract_exp(x: Tensor, z: Tensor) -> Tensor:
    r"""Exponential map of the Euclidean (embedded) metric.

    With :math:`A = X^T Z` and :math:`S = Z^T Z` (Edelman et al. 1998, eq. 2.14):

    .. math::

        \operatorname{Exp}_X(Z) = [X, Z]\,
        \exp\!\begin{pmatrix} A & -S \\ I & A \end{pmatrix}
        \begin{pmatrix} I \\ 0 \end{pmatrix} \exp(-A)

    the formula of geoopt's ``EuclideanStiefel.expmap`` (``EuclideanStiefelExact.retr``).
    Requires ``X^T X = I`` and a tangent ``Z`` (``A`` skew); costs two small matrix
    exponentials (``2p x 2p`` and ``p x p``).

    Args:
        x: Points ``(..., n, p)`` with ``X^T X = I``.
        z: Tangent vectors ``(..., n, p)``.

    Returns:
        Points on the manifold in the computation dtype.
    """
    x, z = _upcast(x, z)
    a = x.transpose(-1, -2) @ z
    s = z.transpose(-1, -2) @ z
    eye = torch.broadcast_to(_eye_like(a), a.shape)
    logw = torch.cat(
        (torch.cat((a, -s), dim=-1), torch.cat((eye, a), dim=-1)),
        dim=-2,
    )
    p = x.shape[-1]
    w = torch.linalg.matrix_exp(logw)[..., :p] @ torch.linalg.matrix_exp(-a)
    return torch.cat((x, z), dim=-1) @ w


@torch.no_grad()
def landing_step(x: Tensor, d: Tensor, mu: float = 1 / 3) -> Tensor:
    r"""Retraction-free landing update (Manifold-LoRA; Ablin & Peyré 2022).

    Given the step ``D = X_new - X_old`` an optimizer proposed from ``X``:

    .. math::

        X \leftarrow X + P_X(D) - \mu\, X (X^T X - I)

    where :math:`X (X^T X - I) = \nabla N(X)` for the penalty
    :math:`N(X) = \tfrac14 \|X^T X - I\|_F^2`. With ``D = 0`` each singular value follows
    :math:`\sigma \leftarrow \sigma - \mu \sigma (\sigma^2 - 1)`, which contracts the drift
    by ``|1 - 2 mu|`` per step near the manifold (``1/3`` for the default ``mu``).

    Args:
        x: Current points ``(..., n, p)``, only approximately orthonormal.
        d: Proposed steps ``(..., n, p)``.
        mu: Penalty step size.

    Returns:
        Updated points in the computation dtype.
    """
    x, d = _upcast(x, d)
    gram = x.transpose(-1, -2) @ x - _eye_like(x)
    return x + project_tangent(x, d) - mu * (x @ gram)


@torch.no_grad()
def drift(x: Tensor) -> Tensor:
    r"""Distance from orthonormality, :math:`\|X^T X - I\|_F` per matrix.

    Args:
        x: Matrices ``(..., n, p)``.

    Returns:
        Drift of shape ``(...)`` in the computation dtype.
    """
    (x,) = _upcast(x)
    gram = x.transpose(-1, -2) @ x - _eye_like(x)
    return torch.linalg.matrix_norm(gram, ord="fro")

