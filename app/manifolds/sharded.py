r"""Manifold math on FSDP2 row shards: local products, one small all-reduce, local writes.

Under :class:`app.fsdp2.AdapterFSDP2Strategy` every constrained factor is sharded along its
long dimension, so each rank holds whole rows of the tall ``n x r`` form. Everything the
Stiefel / sphere steps need from the whole factor is a sum over rows of ``r x r`` (or
``r``-vector) products: each rank computes its local part, one all-reduce per group of
same-rank factors adds them up, the small result is used replicated, and the update applies
to the local rows. Nothing ``n x r`` is gathered:

- StelLA (:mod:`app.manifolds.fused` with ``reduce``): Riemannian gradient ``G - X (G^T X)``
  (``r x r`` all-reduce per factor), post-step Gram products ``X^T X, X^T N, N^T N``
  (``3 r x r`` per factor);
- Manifold-LoRA landing, Stiefel: ``X^T X`` and ``X^T N`` (``2 r x r``); sphere: per column
  ``||x_j||^2`` and ``x_j^T n_j`` (``2 r``);
- the drift monitor: ``X^T X`` (Stiefel) or ``||x_j||^2`` (sphere).

Every function takes *local* tall shards (``rows_local x r``) and an in-place ``reduce``
(:class:`AllReduce` over the data-parallel group, or ``None`` for whole factors on one
device, where the results equal :mod:`app.manifolds.stiefel` / :mod:`app.manifolds.sphere`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["AllReduce", "drift", "landing", "local_rows"]

Reduce = Callable[[Tensor], None]


class AllReduce:
    """In-place sum over a process group; counts the calls and the bytes each one moves.

    Args:
        group: The process group (the data-parallel mesh's group); ``None``: the default.
    """

    def __init__(self, group: object | None = None) -> None:
        self.group = group
        #: Number of all-reduce calls so far.
        self.calls = 0
        #: Bytes of every call, in order (the payload, not the wire protocol's overhead).
        self.sizes: list[int] = []

    def __call__(self, t: Tensor) -> None:
        import torch.distributed as dist

        self.calls += 1
        self.sizes.append(t.numel() * t.element_size())
        dist.all_reduce(t, group=self.group)


def local_rows(t: Tensor) -> Tensor:
    """The local tall shard of a tall factor view: ``to_local()`` of a ``DTensor`` sharded
    along its rows, ``t`` itself otherwise.

    Raises:
        ValueError: If a ``DTensor`` is not sharded along its rows (dim 0 of the tall view):
            the ``r x r`` products would then be partial along ``r`` and wrong.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    placements = [p for p in t.placements if not p.is_replicate()]
    if any(not (isinstance(p, Shard) and p.dim == 0) for p in placements):
        raise ValueError(f"factor of shape {tuple(t.shape)} is sharded as {t.placements}; "
                         "the manifold step needs it sharded along its long dimension "
                         "(app.fsdp2.shard_placement)")
    return t.to_local()


def _groups(xs: Sequence[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.shape[-1], x.dtype, x.device), []).append(i)
    return groups


@torch.no_grad()
def landing(xs: Sequence[Tensor], news: Sequence[Tensor], mu: float, manifold: str,
            outs: Sequence[Tensor], reduce: Reduce | None = None) -> None:
    r"""Manifold-LoRA's landing step :math:`X + P_X(D) - \mu X (X^T X - I)`, ``D = N - X``.

    Gram form, Stiefel: with :math:`C = X^T X`, :math:`K = X^T N` (summed over all rows),
    :math:`X^T D = K - C` and the step is :math:`N + X(-\operatorname{sym}(K - C) -
    \mu (C - I))`. Sphere (per column): :math:`n + x(-(k - c) - \mu (c - 1))` with
    :math:`c = \|x\|^2`, :math:`k = x^T n`. Equals :func:`app.manifolds.stiefel.landing_step`
    / :func:`app.manifolds.sphere.landing_step` on the whole factors.

    Args:
        xs: Local snapshots (tall rows x r).
        news: Local proposals, same shapes.
        mu: Penalty step.
        manifold: ``"stiefel"`` or ``"sphere"``.
        outs: Where to write (may be ``news``).
        reduce: In-place all-reduce of the small products, or ``None``.
    """
    if manifold not in ("stiefel", "sphere"):
        raise ValueError(f"manifold must be 'stiefel' or 'sphere', got {manifold!r}")
    for (r, dtype, device), idx in _groups(xs).items():
        if manifold == "stiefel":
            small = torch.empty(len(idx), 2, r, r, dtype=dtype, device=device)
            for j, i in enumerate(idx):
                xt = xs[i].transpose(0, 1)
                torch.mm(xt, xs[i], out=small[j, 0])
                torch.mm(xt, news[i], out=small[j, 1])
        else:
            small = torch.empty(len(idx), 2, r, dtype=dtype, device=device)
            for j, i in enumerate(idx):
                small[j, 0] = xs[i].square().sum(0)
                small[j, 1] = (xs[i] * news[i]).sum(0)
        if reduce is not None:
            reduce(small)
        c, k = small[:, 0], small[:, 1]
        if manifold == "stiefel":
            a = k - c
            eye = torch.eye(r, dtype=dtype, device=device)
            coef = -0.5 * (a + a.transpose(-1, -2)) - mu * (c - eye)
            for j, i in enumerate(idx):
                value = torch.addmm(news[i], xs[i], coef[j])
                outs[i].copy_(value)
        else:
            coef = -(k - c) - mu * (c - 1.0)
            for j, i in enumerate(idx):
                outs[i].copy_(news[i] + xs[i] * coef[j])


@torch.no_grad()
def drift(xs: Sequence[Tensor], manifold: str, reduce: Reduce | None = None) -> list[float]:
    r"""Distance from the manifold per factor from local rows: Stiefel
    :math:`\|X^T X - I\|_F`, sphere :math:`\|\operatorname{diag}(X^T X) - 1\|_2`
    (as :func:`app.manifolds.stiefel.drift` / :func:`app.manifolds.sphere.drift`).
    """
    out = [0.0] * len(xs)
    for (r, dtype, device), idx in _groups(xs).items():
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if manifold == "stiefel":
            small = torch.stack([xs[i].to(work).transpose(0, 1) @ xs[i].to(work) for i in idx])
        else:
            small = torch.stack([xs[i].to(work).square().sum(0) for i in idx])
        if reduce is not None:
            reduce(small)
        if manifold == "stiefel":
            eye = torch.eye(r, dtype=work, device=device)
            values = torch.linalg.matrix_norm(small - eye, ord="fro")
        else:
            values = torch.linalg.vector_norm(small - 1.0, dim=-1)
        for j, i in enumerate(idx):
            out[i] = float(values[j])
    return out
