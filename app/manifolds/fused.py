r"""StelLA's post-step in Gram form: two passes over the factors, ``r x r`` work in between.

The step of one Stiefel factor (tall ``n x r``): from the snapshot :math:`X` (before the
optimizer step) and the optimizer's proposal :math:`N` (after it), with step scale ``s``
(StelLA's gradient scaling; 1 without it),

.. math::

    D = s (N - X), \qquad \xi = P_X(D) = D - X \operatorname{sym}(X^T D), \qquad
    X \leftarrow R_X(\xi).

Every quantity the retraction needs is an ``r x r`` product of the two ``n x r`` factors.
With :math:`C = X^T X`, :math:`K = X^T N`, :math:`H = N^T N` (pass 1), the usual
:math:`A = X^T D = s(K - C)` and :math:`B = D^T D = s^2 (H - K - K^T + C)`, and
:math:`M = -\operatorname{sym}(A) - s I`, the tangent vector is the combination
:math:`\xi = X M + s N` of the two factors, so

.. math::

    Y = X + \xi = X M_0 + s N,\quad M_0 = I + M, \qquad
    Y^T Y = M_0^T C M_0 + s M_0^T K + s K^T M_0 + s^2 H
          = (I - S)^T C (I - S) + (I - S)^T A + A^T (I - S) + B

(:math:`S = \operatorname{sym}(A)`). The polar factor :math:`Y (Y^T Y)^{-1/2}` is therefore
:math:`X P + N Q` with :math:`W = (Y^T Y)^{-1/2}` (``r x r`` eigendecomposition),
:math:`P = M_0 W`, :math:`Q = s W` (pass 2). The exponential map of the embedded metric
(:func:`app.manifolds.stiefel.retract_exp`) needs :math:`X^T \xi = C M + s K` and
:math:`\xi^T \xi`, also ``r x r``; it becomes ``X P + N Q`` the same way.

Nothing ``n x r`` is stacked, copied or materialised besides the output: pass 1 is three
``r x r`` products per factor written into one small ``(k, 3, r, r)`` tensor, the
coefficients are one batched ``r x r`` computation (float64, a few hundred KB), pass 2 is
two products per factor written straight into the output. Under FSDP2 the same functions
run on local rows: the Gram products are sums over rows, so one all-reduce of the small
tensor (``reduce``) makes them global, and pass 2 applies to the local rows
(:mod:`app.manifolds.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from app.manifolds.newton_schulz import apply_fallback, inverse_sqrt_newton_schulz
from app.manifolds.precision import exact_float32
from app.manifolds.stiefel import inverse_sqrt_psd

__all__ = [
    "combine_into",
    "gram_products",
    "inverse_sqrt_near_identity",
    "polar_coefficients",
    "exp_coefficients",
    "retract_fused",
    "riemannian_grad_",
    "tangent_coefficients",
]

Reduce = Callable[[Tensor], None]
#: How ``(Y^T Y)^{-1/2}`` is computed: ``"eigh"`` (float64 series / eigendecomposition, the
#: default) or ``"newton_schulz"`` (float32 matmuls, :mod:`app.manifolds.newton_schulz`).
PolarSolver = Literal["eigh", "newton_schulz"]


@torch.no_grad()
def gram_products(x: Tensor, n: Tensor, out: Tensor | None = None) -> Tensor:
    """Pass 1 for one factor: ``(C, K, H) = (X^T X, X^T N, N^T N)`` stacked ``(3, r, r)``.

    Args:
        x: Snapshot ``(rows, r)`` (any strides).
        n: Proposal ``(rows, r)``, same dtype.
        out: Optional contiguous ``(3, r, r)`` tensor to write into.

    Returns:
        The products in ``x``'s dtype.
    """
    r = x.shape[-1]
    if out is None:
        out = torch.empty(3, r, r, dtype=x.dtype, device=x.device)
    xt = x.transpose(-1, -2)
    torch.mm(xt, x, out=out[0])
    torch.mm(xt, n, out=out[1])
    torch.mm(n.transpose(-1, -2), n, out=out[2])
    return out


def _split(grams: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c, k, h = grams.unbind(-3)
    return c, k, h, scale.to(grams.dtype).reshape(*scale.shape, 1, 1)


def tangent_coefficients(grams: Tensor, scale: Tensor) -> Tensor:
    r""":math:`M` with :math:`\xi = P_X(s(N - X)) = X M + s N` (batched ``(..., r, r)``).

    Args:
        grams: ``(..., 3, r, r)`` from :func:`gram_products`.
        scale: Step scales ``s`` of shape ``(...)``.

    Returns:
        :math:`M = -\operatorname{sym}(s(K - C)) - s I`.
    """
    c, k, _, s = _split(grams, scale)
    a = s * (k - c)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    return -0.5 * (a + a.transpose(-1, -2)) - s * eye


def _quad(c: Tensor, k: Tensor, h: Tensor, s: Tensor, m: Tensor) -> Tensor:
    """``(X m + s N)^T (X m + s N)`` from the Gram products."""
    mt = m.transpose(-1, -2)
    cross = s * (mt @ k)
    return mt @ c @ m + cross + cross.transpose(-1, -2) + (s * s) * h


def inverse_sqrt_near_identity(g: Tensor, tol: float = 1e-14, radius: float = 0.1) -> Tensor:
    r""":math:`G^{-1/2}` of a batch of symmetric positive semi-definite ``(..., r, r)`` matrices.

    After a small step from the manifold :math:`G = Y^T Y = I + E` with :math:`E` of order
    :math:`\lVert\xi\rVert^2`. When every :math:`\lVert E\rVert_F` (which bounds the
    spectral norm) is below ``radius``, the binomial series
    :math:`\sum_k \binom{-1/2}{k} E^k`, cut at the first order ``K`` with
    :math:`\lVert E\rVert^{K+1} / (1 - \lVert E\rVert) \le` ``tol``, is evaluated by
    Horner's rule in ``K`` batched products: no eigendecomposition, which is most of the
    ``r x r`` work at small steps (batched ``eigh`` of small matrices is slow on CPUs and
    GPUs alike). Otherwise (a large step, or factors that left the manifold)
    :func:`app.manifolds.stiefel.inverse_sqrt_psd`: a clamped symmetric eigendecomposition, so
    a rank-deficient ``G`` stays finite.

    Args:
        g: Symmetric ``(..., r, r)``; the eigendecomposition path symmetrises it.
        tol: Bound on the series' truncation error (spectral norm).
        radius: Largest :math:`\lVert E\rVert_F` the series is used at.

    Returns:
        ``(..., r, r)`` in ``g``'s dtype.
    """
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    e = g - eye
    delta = float(torch.linalg.matrix_norm(e).amax()) if e.numel() else 0.0
    if delta < radius:
        order = 0
        while delta > 0 and delta ** (order + 1) / (1 - delta) > tol:
            order += 1
        coeff = [1.0]
        for j in range(1, order + 1):  # binom(-1/2, j)
            coeff.append(coeff[-1] * (0.5 - j) / j)
        w = torch.broadcast_to(coeff[order] * eye, e.shape)
        for c in reversed(coeff[:order]):  # Horner: w <- c I + E w
            w = e @ w + c * eye
        return w
    return inverse_sqrt_psd(g)


def polar_coefficients(grams: Tensor, scale: Tensor, solver: PolarSolver = "eigh"
                       ) -> tuple[Tensor, Tensor]:
    r"""``(P, Q)`` with :math:`\operatorname{polar}(X + \xi) = X P + N Q`, batched.

    ``solver="eigh"``: the inverse square root of :math:`Y^T Y` is computed in float64 by
    :func:`inverse_sqrt_near_identity` (a short series at small steps, else a clamped
    symmetric eigendecomposition, so a rank-deficient ``Y`` stays finite).
    ``solver="newton_schulz"``: in the Gram products' dtype (float32 for float32 factors) by
    matmuls only (:func:`app.manifolds.newton_schulz.inverse_sqrt_newton_schulz`, error
    bound ``2.3e-10`` inside ``||Y^T Y - I||_F < 0.5``), the matrices outside the bound by the
    float64 eigendecomposition. Each solver reads one value from the device per call (the
    series order, the fallback flag).

    Args:
        grams: ``(..., 3, r, r)`` from :func:`gram_products`.
        scale: Step scales ``s`` of shape ``(...)``.
        solver: ``"eigh"`` or ``"newton_schulz"``.

    Returns:
        ``P`` and ``Q``, ``(..., r, r)`` in float64 (``"eigh"``) or the Gram dtype.

    Raises:
        ValueError: If ``solver`` is unknown.
    """
    if solver not in ("eigh", "newton_schulz"):
        raise ValueError(f"solver must be 'eigh' or 'newton_schulz', got {solver!r}")
    if solver == "newton_schulz":
        c, k, h, s = _split(grams, scale)
        eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
        m0 = eye + tangent_coefficients(grams, scale)
        gram_y = _quad(c, k, h, s, m0)
        w, outside = inverse_sqrt_newton_schulz(gram_y)
        w = apply_fallback(gram_y, w, outside)
        return m0 @ w, s * w
    # the factors get the result in their own dtype: a series error 1000x below its
    # rounding is exact for them (float32: 1.2e-10; float64 factors: 1e-15)
    tol = max(torch.finfo(grams.dtype).eps * 1e-3, 1e-15)
    grams = grams.to(torch.float64)
    c, k, h, s = _split(grams, scale)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    m0 = eye + tangent_coefficients(grams, scale)
    gram_y = _quad(c, k, h, s, m0)
    w = inverse_sqrt_near_identity(gram_y, tol=tol)
    return m0 @ w, s * w


def exp_coefficients(grams: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(P, Q)`` with :math:`\operatorname{Exp}_X(\xi) = X P + N Q` (embedded metric).

    :math:`\operatorname{Exp}_X(\xi) = [X, \xi] \exp\begin{pmatrix} A' & -S' \\ I & A'
    \end{pmatrix} \begin{pmatrix} I \\ 0 \end{pmatrix} \exp(-A')` with
    :math:`A' = X^T \xi`, :math:`S' = \xi^T \xi` (as
    :func:`app.manifolds.stiefel.retract_exp`; assumes :math:`X^T X = I`). Writing the
    ``2r x r`` factor as :math:`(w_1; w_2)`: :math:`P = w_1 + M w_2`, :math:`Q = s w_2`.

    Args:
        grams: ``(..., 3, r, r)`` from :func:`gram_products`.
        scale: Step scales ``s`` of shape ``(...)``.

    Returns:
        ``P`` and ``Q``, ``(..., r, r)`` in float64.
    """
    grams = grams.to(torch.float64)
    c, k, h, s = _split(grams, scale)
    m = tangent_coefficients(grams, scale)
    a = c @ m + s * k
    sq = _quad(c, k, h, s, m)
    r = c.shape[-1]
    eye = torch.broadcast_to(torch.eye(r, dtype=c.dtype, device=c.device), a.shape)
    logw = torch.cat((torch.cat((a, -sq), dim=-1), torch.cat((eye, a), dim=-1)), dim=-2)
    w = torch.linalg.matrix_exp(logw)[..., :r] @ torch.linalg.matrix_exp(-a)
    w1, w2 = w[..., :r, :], w[..., r:, :]
    return w1 + m @ w2, s * w2


@torch.no_grad()
def combine_into(x: Tensor, p: Tensor, n: Tensor, q: Tensor, out: Tensor) -> Tensor:
    """Pass 2 for one factor: ``out = X P + N Q`` (``out`` may be ``N`` itself).

    Writes directly into ``out`` whether it is row-major or a transposed (column-major)
    view, with one temporary of ``out``'s size (``out`` may alias ``n``, never ``x``).

    Args:
        x: Snapshot ``(rows, r)``.
        p: ``(r, r)``, cast to ``x``'s dtype.
        n: Proposal ``(rows, r)``.
        q: ``(r, r)``.
        out: ``(rows, r)`` destination.

    Returns:
        ``out``.
    """
    p, q = p.to(x.dtype), q.to(x.dtype)
    if not out.is_contiguous() and out.transpose(0, 1).is_contiguous():
        # column-major destination (a wide stored factor's tall view): work transposed
        tmp = q.transpose(0, 1) @ n.transpose(0, 1)
        torch.addmm(tmp, p.transpose(0, 1), x.transpose(0, 1), out=out.transpose(0, 1))
        return out
    tmp = n @ q
    if out.is_contiguous():
        torch.addmm(tmp, x, p, out=out)
    else:
        out.copy_(torch.addmm(tmp, x, p))
    return out


@torch.no_grad()
def retract_fused(
    snapshots: Sequence[Tensor],
    proposals: Sequence[Tensor],
    scales: Sequence[float],
    retraction: Literal["polar", "exp"] = "polar",
    outs: Sequence[Tensor] | None = None,
    reduce: Reduce | None = None,
    solver: PolarSolver = "eigh",
) -> list[Tensor]:
    r"""StelLA's post-step for many factors: :math:`R_X(P_X(s(N - X)))`, in Gram form.

    Factors are grouped by ``(r, dtype, device)``; each group gets one small
    ``(k, 3, r, r)`` tensor of Gram products (pass 1), one batched coefficient computation
    and a per-factor combination (pass 2). ``reduce`` (for example an all-reduce sum over
    the ranks that hold the other rows) is applied in place to each group's Gram tensor
    between the passes. Every product runs with IEEE float32 precision
    (:func:`app.manifolds.precision.exact_float32`), whatever TF32 setting the user chose.

    Args:
        snapshots: ``X`` per factor, tall ``(rows, r)``.
        proposals: ``N`` per factor, same shapes.
        scales: ``s`` per factor.
        retraction: ``"polar"`` or ``"exp"``.
        outs: Destinations (may be the proposals themselves); new tensors when ``None``.
        reduce: In-place reduction of a ``(k, 3, r, r)`` Gram tensor, or ``None``.
        solver: The polar retraction's inverse square root (:func:`polar_coefficients`).

    Returns:
        The retracted factors (``outs`` when given).

    Raises:
        ValueError: If the lists differ in length or ``retraction`` is unknown.
    """
    if not len(snapshots) == len(proposals) == len(scales):
        raise ValueError("snapshots, proposals and scales differ in length")
    if retraction not in ("polar", "exp"):
        raise ValueError(f"retraction must be 'polar' or 'exp', got {retraction!r}")
    if retraction == "polar":
        def coefficients(g: Tensor, sc: Tensor) -> tuple[Tensor, Tensor]:
            return polar_coefficients(g, sc, solver)
    else:
        coefficients = exp_coefficients
    with exact_float32():
        return _retract_groups(snapshots, proposals, scales, coefficients, outs, reduce)


def _retract_groups(snapshots: Sequence[Tensor], proposals: Sequence[Tensor],
                    scales: Sequence[float], coefficients: Callable, outs: Sequence[Tensor] | None,
                    reduce: Reduce | None) -> list[Tensor]:
    results: list[Tensor | None] = list(outs) if outs is not None else [None] * len(snapshots)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(snapshots):
        groups.setdefault((x.shape[-1], x.dtype, x.device), []).append(i)
    for (r, dtype, device), idx in groups.items():
        grams = torch.empty(len(idx), 3, r, r, dtype=dtype, device=device)
        for j, i in enumerate(idx):
            gram_products(snapshots[i], proposals[i], out=grams[j])
        if reduce is not None:
            reduce(grams)
        scale = torch.tensor([float(scales[i]) for i in idx], dtype=torch.float64,
                             device=device)
        # one cast per group, not two per factor (a quarter of pass 2's time on small r)
        p, q = (c.to(dtype) for c in coefficients(grams, scale))
        for j, i in enumerate(idx):
            out = results[i]
            if out is None:
                out = torch.empty_like(snapshots[i], memory_format=torch.contiguous_format)
            results[i] = combine_into(snapshots[i], p[j], proposals[i], q[j], out)
    return results  # type: ignore[return-value]


@torch.no_grad()
def riemannian_grad_(xs: Sequence[Tensor], grads: Sequence[Tensor],
                     reduce: Reduce | None = None) -> None:
    r"""In place :math:`G \leftarrow G - X (G^T X)` for every factor (StelLA's pre-step).

    :math:`G^T X` is ``r x r``: one product per factor into a small stacked tensor,
    ``reduce`` (all-reduce under sharding) applied once per group, then one product per
    factor into ``G``. Matches :func:`app.manifolds.stiefel.riemannian_grad`.

    Args:
        xs: Factors, tall ``(rows, r)``.
        grads: Their gradients, same shapes, written in place.
        reduce: In-place reduction of a ``(k, r, r)`` tensor, or ``None``.
    """
    with exact_float32():
        _riemannian_grad_groups(xs, grads, reduce)


def _riemannian_grad_groups(xs: Sequence[Tensor], grads: Sequence[Tensor],
                            reduce: Reduce | None) -> None:
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.shape[-1], x.dtype, x.device), []).append(i)
    for (r, dtype, device), idx in groups.items():
        small = torch.empty(len(idx), r, r, dtype=dtype, device=device)
        for j, i in enumerate(idx):
            torch.mm(grads[i].transpose(0, 1), xs[i], out=small[j])
        if reduce is not None:
            reduce(small)
        for j, i in enumerate(idx):
            g = grads[i]
            if not g.is_contiguous() and g.transpose(0, 1).is_contiguous():
                g.transpose(0, 1).addmm_(small[j].transpose(0, 1), xs[i].transpose(0, 1),
                                         alpha=-1)
            else:
                g.addmm_(xs[i], small[j], alpha=-1)
