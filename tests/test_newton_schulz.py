"""StelLA's matmul-only polar retraction (Newton-Schulz) and the exact-float32 context."""

from __future__ import annotations

import pytest
import torch

from app.manifolds import fused, stiefel
from app.manifolds.newton_schulz import (
    RADIUS,
    apply_fallback,
    inverse_sqrt_newton_schulz,
    newton_schulz_steps,
)
from app.manifolds.precision import exact_float32, precision_state


def _gram_at(dev: float, k: int = 6, r: int = 16, seed: int = 0) -> torch.Tensor:
    """Symmetric ``I + E`` with ``||E||_F == dev`` exactly, float32."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(k, r, r, generator=gen, dtype=torch.float64)
    e = 0.5 * (e + e.transpose(-1, -2))
    e = dev * e / torch.linalg.matrix_norm(e, keepdim=True)
    return (torch.eye(r, dtype=torch.float64) + e).float()


def test_iteration_count_follows_the_bound() -> None:
    assert newton_schulz_steps(0.5, 1e-7) == 5  # 0.5 ** 32 = 2.3e-10 <= 1e-7 < 0.5 ** 16
    assert 0.5 ** (2 ** 5) <= 1e-7 < 0.5 ** (2 ** 4)
    assert newton_schulz_steps(0.1, 1e-7) == 3
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="radius"):
            newton_schulz_steps(bad, 1e-7)


@pytest.mark.parametrize("dev", [1e-6, 1e-3, 0.1, 0.49])
def test_inverse_sqrt_inside_the_bound(dev: float) -> None:
    """Up to the edge of the bound: W G W = I to 1e-5 and W = G^{-1/2} (the polar factor)."""
    g = _gram_at(dev)
    w, outside = inverse_sqrt_newton_schulz(g)
    assert not outside.any()
    eye = torch.eye(g.shape[-1], dtype=torch.float64)
    ortho = torch.linalg.matrix_norm(w.double() @ g.double() @ w.double() - eye, ord=2)
    assert float(ortho.max()) < 1e-5
    expected = stiefel.inverse_sqrt_psd(g.double())
    assert float((w.double() - expected).abs().max()) < 1e-5


def test_outside_the_bound_is_flagged_and_falls_back() -> None:
    inside, far = _gram_at(0.01, k=3), _gram_at(0.9, k=3, seed=1)
    bad = torch.full_like(inside[:1], float("nan"))
    g = torch.cat([inside, far, bad])
    w, outside = inverse_sqrt_newton_schulz(g)
    assert outside.tolist() == [False] * 3 + [True] * 3 + [True]
    fixed = apply_fallback(g[:6], w[:6], outside[:6])
    torch.testing.assert_close(fixed[3:].double(), stiefel.inverse_sqrt_psd(far.double()),
                               atol=1e-5, rtol=0)
    assert fixed[:3].data_ptr() != w.data_ptr() and torch.equal(fixed[:3], w[:3])


@pytest.mark.parametrize("step", [1e-4, 1e-2, 0.3])
def test_retraction_matches_the_eigh_form(step: float) -> None:
    """Gram-form polar retraction: Newton-Schulz == eigh form, both orthonormal to 1e-5, also
    for a step so large that ||Y^T Y - I|| leaves the bound (the fallback then runs)."""
    gen = torch.Generator().manual_seed(3)
    xs = [stiefel.random_orthonormal(n, 8, gen) for n in (300, 120, 300)]
    news = [x + step * torch.randn(x.shape, generator=gen) for x in xs]
    scales = [1.0, 0.6, 1.0]
    ref = fused.retract_fused(xs, news, scales, solver="eigh")
    got = fused.retract_fused(xs, news, scales, solver="newton_schulz")
    for a, b in zip(ref, got):
        assert float(stiefel.drift(b.double())) < 1e-5
        assert float((a - b).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="solver"):
        fused.polar_coefficients(torch.zeros(1, 3, 2, 2), torch.ones(1), "svd")  # type: ignore


def test_exact_float32_sets_ieee_and_restores_the_users_choice() -> None:
    """A user who turned TF32 on gets IEEE products inside and TF32 back after, also when
    the block raises; the retraction leaves the setting as it found it."""
    before = precision_state()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        user = precision_state()
        with exact_float32():
            inside = precision_state()
        assert precision_state() == user != inside
        assert set(inside) <= {"ieee", False, "highest"}
        with pytest.raises(RuntimeError, match="boom"), exact_float32():
            raise RuntimeError("boom")
        assert precision_state() == user
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        seen = []
        real = fused._retract_groups

        def spy(*args):
            seen.append(precision_state())
            return real(*args)

        x = stiefel.random_orthonormal(20, 4, torch.Generator().manual_seed(0))
        fused._retract_groups = spy
        try:
            fused.retract_fused([x], [x + 0.01], [1.0], solver="newton_schulz")
        finally:
            fused._retract_groups = real
        assert seen == [inside] and precision_state() == user
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        # put back the exact stored values of the session
        from app.manifolds import precision

        for slot, value in zip(precision._new_api_slots(), before):
            slot.fp32_precision = value
    assert precision_state() == before


def test_radius_is_below_one() -> None:
    assert 0 < RADIUS < 1
