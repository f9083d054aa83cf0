"""GaRare's paper defaults: N(0, 1/r) projections (same subspace as the QR option) and the
moment reset at a projection change (an option; the shipped fragment's choice)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from app.optim.galore import GaLoreAdamW, GaRareAdamW, random_projection

ROOT = Path(__file__).resolve().parents[1]


def test_gaussian_projection_has_paper_scale_and_the_orthonormal_span() -> None:
    rank = 8
    gauss = random_projection("l.query.weight", 3, 0, (384, 384), rank, normalisation="gaussian")
    ortho = random_projection("l.query.weight", 3, 0, (384, 384), rank)
    assert gauss.shape == ortho.shape == (rank, 384)
    assert gauss.var().item() == pytest.approx(1 / rank, rel=0.1)  # N(0, 1/r) entries
    # Same subspace: projecting the Gaussian rows onto the orthonormal rows changes nothing.
    torch.testing.assert_close(gauss @ ortho.T @ ortho, gauss, atol=1e-5, rtol=1e-5)
    # Step ratio ~ sqrt(min(p, q) / r) = sqrt(48) ~ 6.9 for a unit direction D.
    d = torch.randn(384, rank, generator=torch.Generator().manual_seed(0))
    ratio = ((d @ gauss).norm() / (d @ ortho).norm()).item()
    assert 5.5 < ratio < 8.5
    wide = random_projection("w", 0, 0, (4, 16), 3, normalisation="gaussian")
    assert wide.shape == (4, 3)
    assert GaRareAdamW([("q.weight", nn.Parameter(torch.zeros(6, 4)))], rank=2).defaults[
        "projection_norm"] == "gaussian"


@pytest.mark.parametrize("cls", [GaRareAdamW, GaLoreAdamW])
def test_reset_restarts_the_moments_at_each_projection_change(cls: type) -> None:
    torch.manual_seed(0)
    gap, rank = 3, 2
    b1 = 0.9
    grads = [torch.randn(12, 6) for _ in range(7)]

    def run(mode: str) -> list[torch.Tensor]:
        w = nn.Parameter(torch.randn(12, 6, generator=torch.Generator().manual_seed(1)))
        kw = {"seed": 5} if cls is GaRareAdamW else {}
        opt = cls([("blk.query.weight", w)], lr=0.1, rank=rank, update_proj_gap=gap,
                  moments_on_proj_change=mode, **kw)
        moments = []
        for g in grads:
            w.grad = g.clone()
            opt.step()
            moments.append(opt.state[w]["exp_avg"].clone())
        return moments

    kept, reset = run("keep"), run("reset")
    for i in range(gap):  # the first subspace: identical
        torch.testing.assert_close(kept[i], reset[i])
    # At step `gap` (a new subspace) the reset moment holds only this step's gradient:
    # m = (1 - b1) * R and the previous moments are gone; without reset they carry on.
    first = reset[gap] / (1 - b1)
    assert not torch.allclose(kept[gap], reset[gap])
    torch.testing.assert_close(kept[gap], b1 * kept[gap - 1] + (1 - b1) * first)
    if cls is GaRareAdamW:
        p_mat = random_projection("blk.query.weight", 5, 1, (12, 6), rank,
                                  normalisation="gaussian")
        torch.testing.assert_close(first, grads[gap] @ p_mat.T)


def test_shipped_fragments_state_their_projection_settings() -> None:
    for stem in ("galore", "garare"):
        text = (ROOT / "configs" / "methods" / f"{stem}.yaml").read_text()
        args = yaml.safe_load(text)["model"]["init_args"]["optimizer"]["init_args"]
        # A projection change several times within the shortest comparison run (~600 steps).
        assert args["update_proj_gap"] <= 200 and "update_proj_gap" in text.split("model:")[0]
        assert "moments_on_proj_change" in args
    garare = yaml.safe_load((ROOT / "configs/methods/garare.yaml").read_text())
    assert garare["model"]["init_args"]["optimizer"]["init_args"]["projection_norm"] == \
        "gaussian"
