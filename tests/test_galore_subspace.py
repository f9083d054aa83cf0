"""GaLore's projector (app/optim/subspace.py): the SVD of the whole gradient (one process) and
the all-reduced short-side Gram matrix of row / column shards (FSDP2) give the same ``P``, with
a spectral gap and for a rank-deficient gradient (whose null directions become zero)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from app.optim.galore import GaLoreAdamW
from app.optim.subspace import gram_projection, svd_projection


def _matrix(shape: tuple[int, int], sigma: list[float], seed: int = 0) -> tuple[Tensor, Tensor]:
    """``U diag(sigma) V^T`` in float32 and its exact short-side singular vectors (columns)."""
    gen = torch.Generator().manual_seed(seed)
    p, q = shape
    k = len(sigma)
    u = torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(q, k, generator=gen, dtype=torch.float64))[0]
    g = u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T
    return g.float(), (v if p >= q else u)


def _sharded(g: Tensor, rank: int, null_rtol: float = 1e-3) -> list[Tensor]:
    """Each of two shards' projector: rows (tall) or columns (wide) split in two, the Gram
    matrices summed as the all-reduce would."""
    tall = g.shape[0] >= g.shape[1]
    shards = g.chunk(2, dim=0 if tall else 1)
    grams = [(s.double().T @ s.double()) if tall else (s.double() @ s.double().T)
             for s in shards]
    out = []
    for me, shard in enumerate(shards):
        def reduce(gram: Tensor, other: Tensor = grams[1 - me]) -> None:
            gram.add_(other)
        out.append(gram_projection(shard, rank, tall, reduce, null_rtol))
    return out


def _columns(proj: Tensor, tall: bool) -> Tensor:
    return proj.T if tall else proj


@pytest.mark.parametrize("shape", [(48, 12), (12, 48)])
def test_gram_and_svd_projectors_agree_with_a_spectral_gap(shape: tuple[int, int]) -> None:
    rank, tall = 4, shape[0] >= shape[1]
    g, exact = _matrix(shape, [8.0, 6.0, 4.5, 3.0, 1.0, 0.9, 0.5, 0.2, 0.1, 0.05])
    one = svd_projection(g, rank)
    assert one.shape == ((rank, shape[1]) if tall else (shape[0], rank))
    assert one.dtype == torch.float32
    for sharded in [gram_projection(g, rank, tall, None), *_sharded(g, rank)]:
        torch.testing.assert_close(sharded, one, rtol=0, atol=1e-7)
    cols = _columns(one, tall).double()
    torch.testing.assert_close(cols.T @ cols, torch.eye(rank, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # the top-r singular vectors themselves, each with its largest-magnitude entry positive
    overlap = cols.T @ exact[:, :rank]
    torch.testing.assert_close(overlap.abs(), torch.eye(rank, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    top = cols.abs().argmax(dim=0)
    assert (cols[top, torch.arange(rank)] > 0).all()


@pytest.mark.parametrize("shape", [(48, 12), (12, 48)])
def test_rank_deficient_gradient_gives_zero_null_directions_on_every_path(
        shape: tuple[int, int]) -> None:
    rank, tall = 4, shape[0] >= shape[1]
    g, exact = _matrix(shape, [5.0, 3.0])  # rank 2 (+ float32 rounding)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    other = g + 1e-7 * noise  # the same gradient in another reduction order
    one = svd_projection(g, rank)
    cols = _columns(one, tall)
    assert torch.equal(cols[:, 2:], torch.zeros_like(cols[:, 2:]))  # null: exactly zero
    overlap = cols[:, :2].double().T @ exact
    torch.testing.assert_close(overlap.abs(), torch.eye(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    for sharded in [gram_projection(g, rank, tall, None), *_sharded(g, rank)]:
        torch.testing.assert_close(sharded, one, rtol=0, atol=1e-7)
    for moved in [svd_projection(other, rank), *_sharded(other, rank)]:
        torch.testing.assert_close(moved, one, rtol=0, atol=1e-6)
    # Without the rule the null directions are whatever the rounding makes them.
    loose = _columns(svd_projection(g, rank, null_rtol=0.0), tall)
    loose_other = _columns(svd_projection(other, rank, null_rtol=0.0), tall)
    assert (loose[:, 2:].abs() - loose_other[:, 2:].abs()).abs().max() > 0.1


def test_galore_step_on_a_rank_one_gradient_moves_only_along_it() -> None:
    """Adam would turn the rounding noise of the null directions into full-size steps; with
    them zero the update of a rank-1 gradient ``a b^T`` is a multiple of ``x b^T``."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 1, generator=gen), torch.randn(1, 8, generator=gen)
    w0 = torch.randn(24, 8, generator=gen)
    for rtol, rank_of_update in ((1e-3, 1), (0.0, 4)):
        w = torch.nn.Parameter(w0.clone())
        opt = GaLoreAdamW([("layer.query.weight", w)], lr=0.1, target_modules=["query"],
                          rank=4, update_proj_gap=10, null_rtol=rtol)
        w.grad = a @ b + 1e-9 * torch.randn(24, 8, generator=gen)
        opt.step()
        sigma = torch.linalg.svdvals((w.detach() - w0).double())
        assert int((sigma > 1e-4 * sigma[0]).sum()) == rank_of_update, (rtol, sigma)


def test_zero_gradient_gives_zero_projector_and_no_update() -> None:
    w = torch.nn.Parameter(torch.ones(6, 12))
    opt = GaLoreAdamW([("layer.query.weight", w)], lr=0.1, target_modules=["query"], rank=2)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(opt.state[w]["projector"], torch.zeros(6, 2))
    assert torch.equal(w.detach(), torch.ones(6, 12))


@pytest.mark.parametrize("bad", [-1e-3, 1.0])
def test_null_rtol_out_of_range_is_refused(bad: float) -> None:
    w = torch.nn.Parameter(torch.ones(6, 12))
    with pytest.raises(ValueError, match=rf"null_rtol must be in \[0, 1\), got {bad}"):
        GaLoreAdamW([("layer.query.weight", w)], target_modules=["query"], null_rtol=bad)
