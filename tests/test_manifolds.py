"""Defining-property tests for ``app.manifolds`` (float64 unless stated)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from app.manifolds import batching, sphere, stiefel
from app.manifolds.stiefel import sym

N, P = 9, 4


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _point(gen: torch.Generator, *batch: int, n: int = N, p: int = P) -> torch.Tensor:
    return stiefel.random_orthonormal(n, p, gen, dtype=torch.float64, batch_shape=batch)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _tangent(gen: torch.Generator, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    z = stiefel.project_tangent(x, _randn(gen, *x.shape))
    return scale * z / torch.linalg.matrix_norm(z, keepdim=True)


def _unit_columns(gen: torch.Generator, *shape: int) -> torch.Tensor:
    y = _randn(gen, *shape)
    return y / torch.linalg.vector_norm(y, dim=-2, keepdim=True)


def _geoopt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("geoopt")


# ---------------------------------------------------------------- Stiefel: tangent space


def test_random_orthonormal_on_manifold_and_deterministic() -> None:
    a = stiefel.random_orthonormal(N, P, torch.Generator().manual_seed(0), dtype=torch.float64)
    b = stiefel.random_orthonormal(N, P, torch.Generator().manual_seed(0), dtype=torch.float64)
    c = stiefel.random_orthonormal(N, P, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert a.shape == (N, P) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert stiefel.drift(a) < 1e-12
    # sign correction: R of the QR of the sampled Gaussian has a positive diagonal
    g = torch.randn(N, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (torch.diagonal(a.T @ g) > 0).all()
    with pytest.raises(ValueError):
        stiefel.random_orthonormal(2, 3)


def test_sym_skew_split() -> None:
    m = _randn(torch.Generator().manual_seed(0), 3, P, P)
    assert torch.allclose(stiefel.sym(m) + stiefel.skew(m), m)
    assert torch.equal(stiefel.sym(m), stiefel.sym(m).transpose(-1, -2))
    assert torch.equal(stiefel.skew(m), -stiefel.skew(m).transpose(-1, -2))


def test_project_tangent_is_tangent_and_idempotent(gen: torch.Generator) -> None:
    x = _point(gen, 3)
    z = _randn(gen, 3, N, P)
    pz = stiefel.project_tangent(x, z)
    assert sym(x.transpose(-1, -2) @ z).abs().max() > 1e-1  # raw z is not tangent
    assert sym(x.transpose(-1, -2) @ pz).abs().max() < 1e-12
    assert (stiefel.project_tangent(x, pz) - pz).abs().max() < 1e-12
    # orthogonal projection: the residual is normal, <z - Pz, Pz> = 0
    assert ((z - pz) * pz).sum().abs() < 1e-12


def test_riemannian_grad_is_tangent(gen: torch.Generator) -> None:
    x = _point(gen, 3)
    g = _randn(gen, 3, N, P)
    rg = stiefel.riemannian_grad(x, g)
    assert sym(x.transpose(-1, -2) @ rg).abs().max() < 1e-12
    # canonical metric: not the Euclidean projection of g
    assert (rg - stiefel.project_tangent(x, g)).abs().max() > 1e-3
    # defining property of the canonical-metric gradient: <grad, eta>_c = <g, eta> for
    # every tangent eta, with <a, b>_c = tr(a^T (I - x x^T / 2) b)
    eta = _tangent(gen, x)
    canon = (rg * (eta - 0.5 * x @ (x.transpose(-1, -2) @ eta))).sum((-1, -2))
    eucl = (g * eta).sum((-1, -2))
    assert (canon - eucl).abs().max() < 1e-12


# ---------------------------------------------------------------- Stiefel: retractions


@pytest.mark.parametrize("retract", ["polar_eigh", "polar_svd", "exp"])
def test_retraction_on_manifold_and_identity_at_zero(gen: torch.Generator, retract: str) -> None:
    fn = {
        "polar_eigh": lambda x, z: stiefel.retract_polar(x, z, method="eigh"),
        "polar_svd": lambda x, z: stiefel.retract_polar(x, z, method="svd"),
        "exp": stiefel.retract_exp,
    }[retract]
    x = _point(gen, 4)
    z = _tangent(gen, x, scale=0.7)
    y = fn(x, z)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert stiefel.drift(y).max() < 1e-12
    assert (y - x).abs().max() > 1e-2
    assert (fn(x, torch.zeros_like(x)) - x).abs().max() < 1e-12


def test_polar_eigh_matches_svd(gen: torch.Generator) -> None:
    x = _point(gen, 5)
    z = _tangent(gen, x, scale=2.0)
    a = stiefel.retract_polar(x, z, method="eigh")
    b = stiefel.retract_polar(x, z, method="svd")
    assert (a - b).abs().max() < 1e-10
    with pytest.raises(ValueError):
        stiefel.retract_polar(x, z, method="qr")  # type: ignore[arg-type]


def test_polar_eigh_finite_on_rank_deficient_input() -> None:
    x = torch.zeros(N, P, dtype=torch.float64)
    x[:2, :2] = torch.eye(2, dtype=torch.float64)
    y = stiefel.retract_polar(x, torch.zeros_like(x))
    assert torch.isfinite(y).all()


def test_inverse_sqrt_psd_full_rank_and_rank_deficient(gen: torch.Generator) -> None:
    a = _randn(gen, 4, P, P)
    g = a @ a.transpose(-1, -2) + 0.05 * torch.eye(P, dtype=torch.float64)
    w = stiefel.inverse_sqrt_psd(g)
    eye = torch.eye(P, dtype=torch.float64).expand_as(g)
    torch.testing.assert_close(w @ g @ w, eye, rtol=0, atol=1e-9)  # W G W = I
    torch.testing.assert_close(w, w.transpose(-1, -2), rtol=0, atol=1e-12)
    # an asymmetric rounding error in G is symmetrised away
    noisy = g + 1e-12 * _randn(gen, 4, P, P)
    torch.testing.assert_close(stiefel.inverse_sqrt_psd(noisy), w, rtol=0, atol=1e-8)
    # rank 2: finite, every eigenvalue's inverse root capped at 1 / sqrt(eps * max eigenvalue)
    low = a[..., :2] @ a[..., :2].transpose(-1, -2)
    w = stiefel.inverse_sqrt_psd(low)
    assert torch.isfinite(w).all()
    cap = (torch.finfo(torch.float64).eps * torch.linalg.eigvalsh(low)[..., -1]).rsqrt()
    assert (torch.linalg.eigvalsh(w).abs().amax(-1) <= cap * (1 + 1e-6)).all()


def test_polar_and_exp_agree_to_second_order(gen: torch.Generator) -> None:
    x = _point(gen)
    z = _tangent(gen, x)
    ts = [4e-2, 2e-2, 1e-2, 5e-3]
    errs = [
        torch.linalg.matrix_norm(
            stiefel.retract_polar(x, t * z) - stiefel.retract_exp(x, t * z)
        ).item()
        for t in ts
    ]
    # first-order agreement alone would give ratio 4 (O(t^2)); O(t^3) gives 8
    for e_big, e_small in itertools.pairwise(errs):
        assert 6.5 < e_big / e_small < 9.5
    assert errs[-1] < 5e-3**3


# ---------------------------------------------------------------- Stiefel vs geoopt


def test_against_geoopt(gen: torch.Generator) -> None:
    geoopt = _geoopt()
    eu = geoopt.manifolds.EuclideanStiefel()
    exact = geoopt.manifolds.EuclideanStiefelExact()
    canon = geoopt.manifolds.CanonicalStiefel()
    x = _point(gen, 3)
    g = _randn(gen, 3, N, P)
    z = _tangent(gen, x, scale=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Euclidean tangent projection: EuclideanStiefel.proju
        assert (stiefel.project_tangent(x, g) - eu.proju(x, g)).abs().max() < 1e-10
        # StelLA's gradient is the canonical-metric one: CanonicalStiefel.egrad2rgrad
        assert (stiefel.riemannian_grad(x, g) - canon.egrad2rgrad(x, g)).abs().max() < 1e-10
        # exponential map: EuclideanStiefel.expmap == EuclideanStiefelExact.retr
        assert (stiefel.retract_exp(x, z) - eu.expmap(x, z)).abs().max() < 1e-10
        assert (stiefel.retract_exp(x, z) - exact.retr(x, z)).abs().max() < 1e-10
        # polar factor: geoopt's projx is the SVD polar factor
        assert (stiefel.retract_polar(x, z) - eu.projx(x + z)).abs().max() < 1e-10
        # EuclideanStiefel.retr is a QR retraction, a different point with the same span:
        # compare the orthogonal projectors Y Y^T only.
        q = eu.retr(x, z)
    y = stiefel.retract_polar(x, z)
    assert (q - y).abs().max() > 1e-3
    proj_q = q @ q.transpose(-1, -2)
    proj_y = y @ y.transpose(-1, -2)
    assert (proj_q - proj_y).abs().max() < 1e-10


# ---------------------------------------------------------------- landing


def test_landing_from_perturbed_start_converges(gen: torch.Generator) -> None:
    x = _point(gen, 2) + 1e-2 * _randn(gen, 2, N, P)
    prev = stiefel.drift(x)
    assert (prev > 1e-3).all()
    zero = torch.zeros_like(x)
    for _ in range(40):
        x = stiefel.landing_step(x, zero)
        cur = stiefel.drift(x)
        active = prev > 1e-13  # below this, rounding dominates
        assert (cur[active] < prev[active]).all()
        prev = cur
    assert prev.max() < 1e-10


def test_landing_with_tangent_steps_stays_close(gen: torch.Generator) -> None:
    x = _point(gen, 2)
    x0 = x.clone()
    for _ in range(50):
        d = _tangent(gen, x, scale=1e-2)
        x = stiefel.landing_step(x, d)
    assert stiefel.drift(x).max() < 1e-3
    assert (x - x0).abs().max() > 1e-2  # it actually moved
    # mu = 0 keeps only the tangent part: drift then accumulates instead
    y = x0.clone()
    for _ in range(50):
        y = stiefel.landing_step(y, _tangent(gen, y, scale=1e-2), mu=0.0)
    assert stiefel.drift(y).max() > stiefel.drift(x).max()


def test_landing_penalty_is_grad_of_n(gen: torch.Generator) -> None:
    x = (_point(gen) + 1e-1 * _randn(gen, N, P)).requires_grad_(True)
    eye = torch.eye(P, dtype=torch.float64)
    (0.25 * ((x.T @ x - eye) ** 2).sum()).backward()
    step = stiefel.landing_step(x.detach(), torch.zeros_like(x), mu=1.0)
    assert (x.detach() - step - x.grad).abs().max() < 1e-12


# ---------------------------------------------------------------- sphere


def test_sphere_tangent_and_retract(gen: torch.Generator) -> None:
    x = _unit_columns(gen, 3, N, P)
    z = _randn(gen, 3, N, P)
    pz = sphere.project_tangent(x, z)
    assert (x * pz).sum(-2).abs().max() < 1e-12
    assert (sphere.project_tangent(x, pz) - pz).abs().max() < 1e-12
    y = sphere.retract(x, pz)
    assert sphere.drift(y).max() < 1e-12
    assert (y - x).abs().max() > 1e-2
    assert (sphere.retract(x, torch.zeros_like(x)) - x).abs().max() < 1e-12
    # columns need not be orthogonal: Stiefel drift is large, sphere drift is zero
    assert stiefel.drift(x).min() > 1e-2 and sphere.drift(x).max() < 1e-12


def test_sphere_drift_is_diagonal_of_stiefel_drift(gen: torch.Generator) -> None:
    x = _randn(gen, 4, N, P)
    gram = x.transpose(-1, -2) @ x - torch.eye(P, dtype=torch.float64)
    expected = torch.linalg.vector_norm(torch.diagonal(gram, dim1=-2, dim2=-1), dim=-1)
    assert (sphere.drift(x) - expected).abs().max() < 1e-12


def test_sphere_landing(gen: torch.Generator) -> None:
    x = _unit_columns(gen, 2, N, P) + 1e-2 * _randn(gen, 2, N, P)
    prev = sphere.drift(x)
    assert (prev > 1e-3).all()
    zero = torch.zeros_like(x)
    for _ in range(40):
        x = sphere.landing_step(x, zero)
        cur = sphere.drift(x)
        active = prev > 1e-13
        assert (cur[active] < prev[active]).all()
        prev = cur
    assert prev.max() < 1e-10
    x = _unit_columns(gen, 2, N, P)
    for _ in range(50):
        d = sphere.project_tangent(x, _randn(gen, 2, N, P))
        d = 1e-2 * d / torch.linalg.matrix_norm(d, keepdim=True)
        x = sphere.landing_step(x, d)
    assert sphere.drift(x).max() < 1e-3


# ---------------------------------------------------------------- batching and dtypes


def _ops(gen: torch.Generator) -> dict:
    return {
        "project_tangent": lambda x, z: stiefel.project_tangent(x, z),
        "riemannian_grad": lambda x, z: stiefel.riemannian_grad(x, z),
        "polar_eigh": lambda x, z: stiefel.retract_polar(x, 0.3 * z),
        "polar_svd": lambda x, z: stiefel.retract_polar(x, 0.3 * z, method="svd"),
        "exp": lambda x, z: stiefel.retract_exp(x, 0.3 * stiefel.project_tangent(x, z)),
        "landing": lambda x, z: stiefel.landing_step(x + 1e-2 * z, 1e-2 * z),
        "drift": lambda x, z: stiefel.drift(x + 1e-2 * z),
        "sphere_project": lambda x, z: sphere.project_tangent(x, z),
        "sphere_retract": lambda x, z: sphere.retract(x, z),
        "sphere_landing": lambda x, z: sphere.landing_step(x + 1e-2 * z, 1e-2 * z),
        "sphere_drift": lambda x, z: sphere.drift(x + 1e-2 * z),
    }


@pytest.mark.parametrize(
    "op",
    [
        "project_tangent", "riemannian_grad", "polar_eigh", "polar_svd", "exp", "landing",
        "drift", "sphere_project", "sphere_retract", "sphere_landing", "sphere_drift",
    ],
)
def test_batched_equals_loop(gen: torch.Generator, op: str) -> None:
    fn = _ops(gen)[op]
    x = _point(gen, 2, 3)
    z = _randn(gen, 2, 3, N, P)
    batched = fn(x, z)
    looped = torch.stack(
        [torch.stack([fn(x[i, j], z[i, j]) for j in range(3)]) for i in range(2)]
    )
    assert batched.shape == looped.shape
    assert (batched - looped).abs().max() < 1e-12


_LOW_PRECISION_OPS = {
    "project_tangent": stiefel.project_tangent,
    "riemannian_grad": stiefel.riemannian_grad,
    "polar_eigh": stiefel.retract_polar,
    "exp": stiefel.retract_exp,
    "landing": stiefel.landing_step,
    "drift": lambda x, z: stiefel.drift(x),
    "sphere_landing": sphere.landing_step,
    "sphere_drift": lambda x, z: sphere.drift(x),
}


@pytest.mark.parametrize("op", list(_LOW_PRECISION_OPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computed_in_float32(
    gen: torch.Generator, op: str, dtype: torch.dtype
) -> None:
    fn = _LOW_PRECISION_OPS[op]
    x = (_point(gen, 3) + 1e-2 * _randn(gen, 3, N, P)).to(dtype)
    z = _tangent(gen, _point(gen, 3), scale=0.3).to(dtype)
    if op == "exp":
        x = _point(gen, 3).to(dtype)
        z = stiefel.project_tangent(x, z).to(dtype)
    out = fn(x, z)
    assert out.dtype == torch.float32
    # same inputs upcast by hand: identical up to float32 rounding, far below bf16's 4e-3
    ref = fn(x.to(torch.float32), z.to(torch.float32))
    assert (out - ref).abs().max() < 1e-6


def test_retraction_in_float32_from_bf16_lands_on_manifold(gen: torch.Generator) -> None:
    x = _point(gen, 3).to(torch.bfloat16)
    z = (0.1 * _randn(gen, 3, N, P)).to(torch.bfloat16)
    y = stiefel.retract_polar(x, z)
    assert y.dtype == torch.float32
    assert stiefel.drift(y).max() < 1e-5
    assert stiefel.random_orthonormal(N, P, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_group_by_shape_and_stack_roundtrip(gen: torch.Generator) -> None:
    shapes = [(5, 2), (7, 3), (5, 2), (4, 4), (7, 3), (5, 2)]
    ts = [_randn(gen, *s) for s in shapes]
    groups = batching.group_by_shape(ts)
    assert list(groups) == [(5, 2), (7, 3), (4, 4)]
    assert groups == {(5, 2): [0, 2, 5], (7, 3): [1, 4], (4, 4): [3]}
    stacked = batching.stack_groups(ts)
    assert [s.shape for _, s in stacked] == [(3, 5, 2), (2, 7, 3), (1, 4, 4)]
    back = batching.unstack(stacked, len(ts))
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    with pytest.raises(ValueError):
        batching.unstack(stacked[:2], len(ts))


def test_apply_grouped_matches_per_tensor(gen: torch.Generator) -> None:
    shapes = [(6, 2), (8, 3), (6, 2), (8, 3), (5, 5)]
    xs = [_point(gen, n=n, p=p) for n, p in shapes]
    zs = [_randn(gen, n, p) for n, p in shapes]
    calls: list[tuple[int, ...]] = []

    def polar(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return stiefel.retract_polar(x, 0.2 * z)

    out = batching.apply_grouped(polar, xs, zs)
    assert calls == [(2, 6, 2), (2, 8, 3), (1, 5, 5)]  # one call per shape group
    for x, z, y in zip(xs, zs, out):
        assert y.shape == x.shape
        assert (y - stiefel.retract_polar(x, 0.2 * z)).abs().max() < 1e-12
    drifts = batching.apply_grouped(stiefel.drift, xs)
    assert all(d.shape == () and d < 1e-12 for d in drifts)
    with pytest.raises(ValueError):
        batching.apply_grouped(polar, xs, zs[:2])
    with pytest.raises(ValueError):
        batching.apply_grouped(polar)
