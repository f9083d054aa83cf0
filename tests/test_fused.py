"""The Gram-form StelLA post-step (``app.manifolds.fused``) against the direct path and geoopt.

float64 unless stated: tangent property, lands on the manifold, equals the polar factor of
``X + P_X(D)`` (and the exponential map), in place into row- and column-major parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from app.manifolds import fused, stiefel
from app.manifolds.stiefel import sym

SHAPES = [(40, 4), (40, 4), (23, 4), (64, 6)]  # two r groups, mixed row counts


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _geoopt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("geoopt")


def _pairs(gen: torch.Generator, step: float = 0.1, dtype=torch.float64):
    """(snapshot X on the manifold, proposal N = X + step * noise) per shape."""
    xs, ns = [], []
    for n, r in SHAPES:
        x = stiefel.random_orthonormal(n, r, gen, dtype=dtype)
        xs.append(x)
        ns.append(x + step * torch.randn(n, r, generator=gen, dtype=dtype))
    return xs, ns


def _direct(x, n, s, retraction="polar", method="eigh"):
    xi = stiefel.project_tangent(x, s * (n - x))
    if retraction == "exp":
        return stiefel.retract_exp(x, xi)
    return stiefel.retract_polar(x, xi, method=method)


def test_tangent_coefficients_give_the_projection(gen: torch.Generator) -> None:
    geoopt = _geoopt()
    xs, ns = _pairs(gen)
    for x, n in zip(xs, ns):
        s = 0.7
        grams = fused.gram_products(x, n)
        assert torch.allclose(grams[0], x.T @ x) and torch.allclose(grams[1], x.T @ n)
        assert torch.allclose(grams[2], n.T @ n)
        m = fused.tangent_coefficients(grams, torch.tensor(s, dtype=torch.float64))
        xi = x @ m + s * n
        assert sym(x.T @ xi).abs().max() < 1e-12  # tangent at X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = geoopt.manifolds.EuclideanStiefel().proju(x, s * (n - x))
        assert (xi - expected).abs().max() < 1e-12


@pytest.mark.parametrize("retraction", ["polar", "exp"])
def test_equals_direct_projection_and_retraction(gen: torch.Generator, retraction: str) -> None:
    geoopt = _geoopt()
    xs, ns = _pairs(gen)
    scales = [1.0, 0.5, 2.0, 1.0 / 3]
    got = fused.retract_fused(xs, ns, scales, retraction)
    for x, n, s, y in zip(xs, ns, scales, got):
        assert stiefel.drift(y) < 1e-12  # on the manifold
        assert (y - _direct(x, n, s, retraction)).abs().max() < 1e-12
        xi = stiefel.project_tangent(x, s * (n - x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if retraction == "polar":
                ref = geoopt.manifolds.EuclideanStiefel().projx(x + xi)  # SVD polar factor
                assert (y - _direct(x, n, s, method="svd")).abs().max() < 1e-12
            else:
                ref = geoopt.manifolds.EuclideanStiefelExact().retr(x, xi)
        assert (y - ref).abs().max() < 1e-12


def test_zero_step_is_identity(gen: torch.Generator) -> None:
    xs, _ = _pairs(gen)
    for retraction in ("polar", "exp"):
        got = fused.retract_fused(xs, [x.clone() for x in xs], [1.0] * len(xs), retraction)
        assert all((y - x).abs().max() < 1e-13 for x, y in zip(xs, got))


def test_in_place_into_row_and_column_major_parameters(gen: torch.Generator) -> None:
    xs, ns = _pairs(gen)
    expected = [_direct(x, n, 1.0) for x, n in zip(xs, ns)]
    # parameters as StelLA stores them: U tall (rows x r), V wide (r x rows) seen as V^T
    stored = [n.clone() if i % 2 == 0 else n.T.contiguous() for i, n in enumerate(ns)]
    views = [t if i % 2 == 0 else t.T for i, t in enumerate(stored)]
    ptrs = [t.data_ptr() for t in stored]
    snaps = [x.clone() if i % 2 == 0 else x.T.contiguous().T for i, x in enumerate(xs)]
    out = fused.retract_fused(snaps, views, [1.0] * len(xs), outs=views)
    assert [t.data_ptr() for t in stored] == ptrs and all(o is v for o, v in zip(out, views))
    for i, (t, e) in enumerate(zip(stored, expected)):
        assert ((t if i % 2 == 0 else t.T) - e).abs().max() < 1e-12


def test_reduce_over_row_blocks_equals_whole(gen: torch.Generator) -> None:
    """Rows split in two blocks (as two FSDP2 shards): summing the block Gram products
    between the passes gives each block its rows of the whole-factor result."""
    xs, ns = _pairs(gen)
    whole = fused.retract_fused(xs, ns, [0.8] * len(xs))
    halves = [(x.shape[0] + 1) // 2 for x in xs]
    top = [(x[:h], n[:h]) for x, n, h in zip(xs, ns, halves)]
    bottom = [(x[h:], n[h:]) for x, n, h in zip(xs, ns, halves)]

    def grams_of(part):
        return torch.stack([fused.gram_products(x, n) for x, n in part])

    calls = []

    def add_other(part):
        def reduce(grams: torch.Tensor) -> None:
            calls.append(tuple(grams.shape))
            idx = [i for i, (_, r) in enumerate(SHAPES) if r == grams.shape[-1]]
            grams += grams_of([part[i] for i in idx])
        return reduce

    out_top = fused.retract_fused(*zip(*top), [0.8] * len(xs), reduce=add_other(bottom))
    out_bottom = fused.retract_fused(*zip(*bottom), [0.8] * len(xs), reduce=add_other(top))
    for y, a, b in zip(whole, out_top, out_bottom):
        assert (torch.cat([a, b]) - y).abs().max() < 1e-12
    assert calls == [(3, 3, 4, 4), (1, 3, 6, 6)] * 2  # one small reduce per r group


def test_riemannian_grad_in_place(gen: torch.Generator) -> None:
    geoopt = _geoopt()
    xs, _ = _pairs(gen)
    grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    expected = [stiefel.riemannian_grad(x, g) for x, g in zip(xs, grads)]
    stored = [g.clone() if i % 2 == 0 else g.T.contiguous() for i, g in enumerate(grads)]
    views = [t if i % 2 == 0 else t.T for i, t in enumerate(stored)]
    fused.riemannian_grad_(xs, views)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        canon = geoopt.manifolds.CanonicalStiefel()
        for x, g, v, e in zip(xs, grads, views, expected):
            assert (v - e).abs().max() < 1e-12
            assert (v - canon.egrad2rgrad(x, g)).abs().max() < 1e-12


def test_float32_adapter_shape_stays_orthonormal(gen: torch.Generator) -> None:
    """fp32 at a LLaMA-sized factor: orthonormal to 1e-5, close to the direct eigh path."""
    x = stiefel.random_orthonormal(4096, 32, gen)
    n = x + 1e-3 * torch.randn(4096, 32, generator=gen)
    for _ in range(5):  # repeated steps do not accumulate drift
        y = fused.retract_fused([x], [n], [1.0])[0]
        assert y.dtype == torch.float32 and stiefel.drift(y) < 1e-5
        assert (y - _direct(x.double(), n.double(), 1.0)).abs().max() < 1e-5
        x, n = y, y + 1e-3 * torch.randn(4096, 32, generator=gen)


def test_bad_arguments() -> None:
    x = torch.eye(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="differ in length"):
        fused.retract_fused([x], [x, x], [1.0])
    with pytest.raises(ValueError, match="retraction"):
        fused.retract_fused([x], [x], [1.0], "cayley")


def _eigh_inverse_sqrt(g: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(g)
    return (v * lam.rsqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


@pytest.mark.parametrize("size", [1e-2, 1e-4, 1e-7, 0.0])
def test_series_inverse_sqrt_near_identity_matches_eigh(gen: torch.Generator, size) -> None:
    a = torch.randn(5, 8, 8, generator=gen, dtype=torch.float64)
    g = torch.eye(8, dtype=torch.float64) + size * (a + a.transpose(-1, -2)) / 2
    w = fused.inverse_sqrt_near_identity(g)
    assert w.shape == g.shape
    torch.testing.assert_close(w, _eigh_inverse_sqrt(g), rtol=0, atol=1e-13)
    # the defining property, W G W = I, and W symmetric
    torch.testing.assert_close(w @ g @ w, torch.eye(8, dtype=torch.float64).expand_as(g),
                               rtol=0, atol=1e-13)
    torch.testing.assert_close(w, w.transpose(-1, -2), rtol=0, atol=1e-15)


def test_series_is_used_near_identity_and_eigh_elsewhere(gen: torch.Generator,
                                                         monkeypatch) -> None:
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or real(m))
    a = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    near = torch.eye(6, dtype=torch.float64) + 1e-5 * (a + a.transpose(-1, -2))
    fused.inverse_sqrt_near_identity(near)
    assert not calls
    far = a @ a.transpose(-1, -2) + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(fused.inverse_sqrt_near_identity(far), _eigh_inverse_sqrt(far))
    assert calls
    # rank-deficient: finite through the clamped eigendecomposition
    low = a[:, :, :2] @ a[:, :, :2].transpose(-1, -2)
    assert torch.isfinite(fused.inverse_sqrt_near_identity(low)).all()


@pytest.mark.parametrize("step", [1e-3, 1e-5])
def test_small_steps_equal_the_direct_polar_retraction(gen: torch.Generator, step) -> None:
    """At training-size steps the series path runs; the result is the direct polar factor."""
    xs, ns = _pairs(gen, step=step)
    scales = [1.0, 0.5, 2.0, 1.0]
    expected = [_direct(x, n, s) for x, n, s in zip(xs, ns, scales)]
    out = fused.retract_fused(xs, ns, scales)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        eye = torch.eye(got.shape[1], dtype=got.dtype)
        torch.testing.assert_close(got.T @ got, eye, rtol=0, atol=1e-12)


def test_float32_small_steps_match_the_float64_direct_path(gen: torch.Generator) -> None:
    """float32 factors get a looser series tolerance; still the polar factor to fp32 rounding."""
    xs, ns = _pairs(gen, step=2e-3)
    expected = [_direct(x, n, 1.0) for x, n in zip(xs, ns)]
    out = fused.retract_fused([x.float() for x in xs], [n.float() for n in ns], [1.0] * 4)
    for got, want in zip(out, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
        eye = torch.eye(got.shape[1])
        torch.testing.assert_close(got.T @ got, eye, rtol=0, atol=2e-6)
