"""Tests for GaLore / GaRare (app.optim.galore) and the memory helpers (app.optim.memory)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from app.optim.galore import (
    GaLoreAdamW,
    GaRareAdamW,
    projection_seed,
    random_projection,
)
from app.optim.memory import (
    optimizer_state_breakdown,
    optimizer_state_bytes,
    process_peak_memory_bytes,
    trainable_parameter_bytes,
)

OPTIMIZERS = [GaLoreAdamW, GaRareAdamW]


class Net(nn.Module):
    """Embedding, a tall target (16 x 8), a wide target (4 x 16), LayerNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.query = nn.Linear(8, 16)
        self.value = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.query(self.embed(idx)))
        return self.head(self.norm(self.value(h)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 10, (6,), generator=gen), torch.randn(6, 3, generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        idx, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(idx), y).backward()
        opt.step()


def _reference_update(g: Tensor, p_mat: Tensor, tall: bool, eps: float = 1e-8) -> Tensor:
    """Back-projected first Adam direction: m_hat = R, v_hat = R^2."""
    r = g @ p_mat.T if tall else p_mat.T @ g
    d = r / (r.abs() + eps)
    return d @ p_mat if tall else p_mat @ d


@pytest.mark.parametrize("shape", [(12, 6), (6, 12)])
def test_galore_steps_equal_direct_svd_computation(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w0, grads = torch.randn(*shape), [torch.randn(*shape) for _ in range(3)]
    w = nn.Parameter(w0.clone())
    lr, wd, scale, eps = 0.1, 0.05, 0.5, 1e-8
    opt = GaLoreAdamW([("layer.query.weight", w)], lr=lr, weight_decay=wd, eps=eps,
                      target_modules=["query"], rank=3, update_proj_gap=2, scale=scale)
    tall = shape[0] >= shape[1]
    expected, m, v = w0.clone(), torch.zeros(()), torch.zeros(())
    for step, g in enumerate(grads):  # P from the SVD at steps 0 and 2, reused at step 1
        w.grad = g.clone()
        opt.step()
        if step % 2 == 0:  # singular vectors with their largest-magnitude entry positive
            u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
            p_mat = (vh[:3] if tall else u[:, :3].T).float()
            p_mat = p_mat * p_mat.gather(1, p_mat.abs().argmax(1, keepdim=True)).sign()
            p_mat = p_mat if tall else p_mat.T.contiguous()
        r = g @ p_mat.T if tall else p_mat.T @ g
        m, v = 0.9 * m + 0.1 * r, 0.999 * v + 0.001 * r * r
        t = step + 1
        d = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + eps)
        expected = (expected - lr * scale * (d @ p_mat if tall else p_mat @ d)) * (1 - lr * wd)
        if step == 0:  # first step: direction R / (|R| + eps), independent of P's sign
            first = (w0 - lr * scale * _reference_update(g, p_mat, tall, eps)) * (1 - lr * wd)
            torch.testing.assert_close(w.detach(), first)
        torch.testing.assert_close(w.detach(), expected)
        assert opt.state[w]["projector"].shape == p_mat.shape
        torch.testing.assert_close(opt.state[w]["projector"], p_mat)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_non_target_parameters_match_torch_adamw(opt_cls: type) -> None:
    a, b = _net(), _net()
    ours = opt_cls(a.named_parameters(), lr=0.01, weight_decay=0.1, target_modules=["query"],
                   rank=2)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # identical gradients, so only the update rule can differ
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        ours.step()
        ref.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if name == "query.weight":
            assert not torch.allclose(pa, pb)
        else:
            assert torch.equal(pa, pb), name
            assert torch.equal(ours.state[pa]["exp_avg_sq"], ref.state[pb]["exp_avg_sq"])
            assert torch.equal(ours.state[pa]["step"], ref.state[pb]["step"])


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_resume_mid_run_equals_uninterrupted(opt_cls: type) -> None:
    kw = {"lr": 0.02, "weight_decay": 0.01, "target_modules": ["query", "value"], "rank": 2,
          "update_proj_gap": 3}
    if opt_cls is GaRareAdamW:
        kw["seed"] = 7
    full = _net()
    opt_full = opt_cls(full.named_parameters(), **kw)
    _train(full, opt_full, range(10))

    part = _net()
    opt_part = opt_cls(part.named_parameters(), **kw)
    _train(part, opt_part, range(5))
    model_sd, opt_sd = copy.deepcopy(part.state_dict()), _roundtrip(opt_part.state_dict())
    for per_param in opt_sd["state"].values():
        assert all(isinstance(v, (Tensor, int, float)) for v in per_param.values())
    resumed = _net(seed=123)
    resumed.load_state_dict(model_sd)
    opt_resumed = opt_cls(resumed.named_parameters(), **kw)
    opt_resumed.load_state_dict(opt_sd)
    _train(resumed, opt_resumed, range(5, 10))
    for (name, pa), pb in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_garare_two_ranks_identical() -> None:
    a, b = _net(), _net()
    oa = GaRareAdamW(a.named_parameters(), lr=0.02, rank=2, update_proj_gap=3, seed=3)
    ob = GaRareAdamW(b.named_parameters(), lr=0.02, rank=2, update_proj_gap=3, seed=3)
    _train(a, oa, range(7))
    _train(b, ob, range(7))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = _net()
    oc = GaRareAdamW(c.named_parameters(), lr=0.02, rank=2, update_proj_gap=3, seed=4)
    _train(c, oc, range(7))
    assert not torch.equal(a.query.weight, c.query.weight)


def test_random_projection_depends_on_block_name_seed() -> None:
    p0 = random_projection("q.weight", 0, 0, (16, 8), 3)
    assert p0.shape == (3, 8)
    torch.testing.assert_close(p0 @ p0.T, torch.eye(3))
    assert torch.equal(p0, random_projection("q.weight", 0, 0, (16, 8), 3))
    assert not torch.allclose(p0, random_projection("q.weight", 0, 1, (16, 8), 3))
    assert not torch.allclose(p0, random_projection("k.weight", 0, 0, (16, 8), 3))
    assert not torch.allclose(p0, random_projection("q.weight", 1, 0, (16, 8), 3))
    wide = random_projection("q.weight", 0, 0, (4, 16), 3)
    assert wide.shape == (4, 3)
    torch.testing.assert_close(wide.T @ wide, torch.eye(3))
    assert projection_seed(0, "q.weight", 0) == projection_seed(0, "q.weight", 0) < 2**63


def test_garare_projection_changes_exactly_at_block_boundaries() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 6))
    gap, rank = 3, 2
    opt = GaRareAdamW([("blk.query.weight", w)], lr=0.1, rank=rank, update_proj_gap=gap, seed=5)

    def residual(delta: Tensor, block: int) -> float:
        p_mat = random_projection("blk.query.weight", 5, block, (12, 6), rank)
        return float((delta - delta @ p_mat.T @ p_mat).norm() / delta.norm())

    for step in range(8):
        before = w.detach().clone()
        w.grad = torch.randn(12, 6)
        opt.step()
        delta = w.detach() - before  # rows lie in the row space of this step's P
        block = step // gap
        assert residual(delta, block) < 1e-5
        for other in {block - 1, block + 1} - {-1}:
            assert residual(delta, other) > 0.1
    assert "projector" not in opt.state[w]


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_state_bytes_match_analytic_counts(opt_cls: type) -> None:
    model, r = _net(), 3
    opt = opt_cls(model.named_parameters(), target_modules=["query", "value"], rank=r)
    _train(model, opt, range(1))
    expected = {"exp_avg": 0, "exp_avg_sq": 0, "projector": 0, "step": 0}
    for name, prm in model.named_parameters():
        expected["step"] += 4
        if name in ("query.weight", "value.weight"):  # p x q: moments max(p,q) x r
            rows, cols = prm.shape
            assert opt.state[prm]["exp_avg"].shape == ((rows, r) if rows >= cols else (r, cols))
            expected["exp_avg"] += 4 * r * max(rows, cols)
            expected["exp_avg_sq"] += 4 * r * max(rows, cols)
            if opt_cls is GaLoreAdamW:
                expected["projector"] += 4 * r * min(rows, cols)
        else:  # plain AdamW: 2 m n
            expected["exp_avg"] += 4 * prm.numel()
            expected["exp_avg_sq"] += 4 * prm.numel()
    if opt_cls is GaRareAdamW:
        del expected["projector"]
    assert optimizer_state_breakdown(opt) == expected
    assert optimizer_state_bytes(opt) == sum(expected.values())
    ref_model = _net()
    ref = torch.optim.AdamW(ref_model.parameters())
    _train(ref_model, ref, range(1))
    full = sum(4 * (2 * p.numel() + 1) for p in ref_model.parameters())
    assert optimizer_state_bytes(ref) == full > optimizer_state_bytes(opt)


def test_bf16_parameters_keep_fp32_projected_state_after_load() -> None:
    w = nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = GaLoreAdamW([("m.query.weight", w)], target_modules=["query"], rank=2)
    w.grad = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.step()
    sd = _roundtrip(opt.state_dict())
    opt2 = GaLoreAdamW([("m.query.weight", w)], target_modules=["query"], rank=2)
    opt2.load_state_dict(sd)
    for key in ("exp_avg", "exp_avg_sq", "projector"):
        assert opt2.state[w][key].dtype == torch.float32
        assert torch.equal(opt2.state[w][key], opt.state[w][key])


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_validation_errors(opt_cls: type) -> None:
    model = _net()
    with pytest.raises(ValueError, match=r"target_modules=\['key'\].*query.weight"):
        opt_cls(model.named_parameters(), target_modules=["key"])
    with pytest.raises(ValueError, match=r"rank=5 exceeds.*'value.weight'.*\(4, 16\)"):
        opt_cls(model.named_parameters(), target_modules=["value"], rank=5)
    with pytest.raises(ValueError, match="rank must be"):
        opt_cls(model.named_parameters(), target_modules=["query"], rank=0)
    with pytest.raises(ValueError, match="update_proj_gap must be"):
        opt_cls(model.named_parameters(), target_modules=["query"], update_proj_gap=0)
    with pytest.raises(ValueError, match="needs named parameters"):
        opt_cls(model.parameters(), target_modules=["query"], rank=2)
    # plain parameters are accepted when target_modules is None (all 2-D weights projected)
    opt = opt_cls(model.parameters(), rank=2)
    assert sum(sum(g["projected"]) for g in opt.param_groups) == 4
    # by name, embeddings are left to AdamW
    opt = opt_cls(model.named_parameters(), rank=2)
    assert opt.param_groups[0]["projected"][0] is False
    # "query" is a component match, not a raw substring
    with pytest.raises(ValueError, match="matched no 2-D"):
        opt_cls(model.named_parameters(), target_modules=["quer"])


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_regression_least_squares_loss_decreases(opt_cls: type) -> None:
    torch.manual_seed(0)
    x, a = torch.randn(128, 16), torch.randn(16, 8)
    y = x @ a
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    opt = opt_cls(model.named_parameters(), lr=0.01, rank=4, update_proj_gap=20, scale=1.0)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_memory_helpers() -> None:
    model = _net()
    model.embed.weight.requires_grad_(False)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert trainable_parameter_bytes(model) == total - 10 * 8 * 4
    assert process_peak_memory_bytes() > 0
