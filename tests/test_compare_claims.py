"""The papers' claims section of a comparison report: verdicts from hand-made runs whose paired
intervals are known, the baseline a claim names (not the table's), savings, the no-learning
floor, and lower-is-better metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.compare import report
from app.compare.claims import CLAIMS, Claim, check_claims, steps_to_loss

REFERENCE = {"kind": "majority", "task": "mrpc", "metrics": {"val/score": 0.6838},
             "train_loss": 0.631, "n_eval": 408, "description": "majority class"}


def _run(method: str, seed: int, final: float, *, rank: int | None = 8, best: float | None = None,
         **fields: float) -> dict:
    return {"name": f"{method}-{seed}", "method": method, "rank": rank, "seed": seed,
            "lr": 1e-3, "metric": "val/score", "mode": "max",
            "best": final + 0.01 if best is None else best, "final": final,
            "loss_curve": {"step": [1, 2], "loss": [0.7, 0.6]}, **fields}


def _runs(method: str, finals: tuple[float, ...], **kw: float) -> list[dict]:
    return [_run(method, s, v, **kw) for s, v in enumerate(finals)]


def _claims(tmp_path: Path, results: list[dict], reference: dict | None = REFERENCE,
            **kw: object) -> tuple[list[dict], str]:
    files = report.write_report(tmp_path, results, baseline="lora", reference=reference,
                                plots=False, **kw)
    payload = json.loads(files["json"].read_text())
    return payload["claims"], files["markdown"].read_text()


def _row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_verdicts_follow_the_interval_and_the_claim(tmp_path: Path) -> None:
    results = _runs("lora", (0.80, 0.82, 0.84), trainable_params=1000)
    # stella - lora = +0.03 on every seed: separable above 0.
    results += _runs("stella", (0.83, 0.85, 0.87))
    # allora - lora = 0.01, 0.02, 0.01 (the interval [-0.0010, +0.0277] holds 0).
    results += _runs("allora", (0.81, 0.84, 0.85))
    # manifold_sphere - lora = -0.02 on every seed: separably worse.
    results += _runs("manifold_sphere", (0.78, 0.80, 0.82))
    # asymmetric: parity claim; -0.01, +0.01, 0: not separable; fewer trainable parameters.
    results += _runs("asymmetric", (0.79, 0.83, 0.84), trainable_params=800)
    claims, text = _claims(tmp_path, results)
    by = {c["method"]: c for c in claims}
    # Only claims whose two methods ran; none for garare / galore / riemannian_lora here.
    assert set(by) == {"stella", "allora", "manifold_sphere", "asymmetric"}
    assert by["stella"]["quality"] == "reproduced"
    assert by["allora"]["quality"] == "not separable"
    ci = by["allora"]["final"]["ci95"]
    half = 4.302653 * 0.0057735 / math.sqrt(3)
    assert (ci["low"], ci["high"]) == pytest.approx((0.04 / 3 - half, 0.04 / 3 + half), abs=1e-5)
    assert by["manifold_sphere"]["quality"] == "not reproduced (worse)"
    assert by["asymmetric"]["quality"] == "not separable"
    assert by["asymmetric"]["cost"] == {"field": "trainable_params", "method": 800.0,
                                        "baseline": 1000.0, "ratio": 0.8, "holds": True}
    assert by["stella"]["cost"] is None
    # best = final + 0.01 for every run: the same differences, the same verdicts.
    assert all(c["quality_best"] == c["quality"] for c in claims)
    assert "## The papers' claims at this scale" in text
    row = _row(text, "| `stella` better than `lora` |")
    assert "| +0.0300 [+0.0300, +0.0300] (n=3) |" in row and "| reproduced | reproduced |" in row
    row = _row(text, "| `asymmetric` matches `lora` |")
    assert "| not separable |" in row and "trainable 0.800x (-200; holds)" in row


def test_a_claim_is_judged_against_its_own_baseline(tmp_path: Path) -> None:
    # The table's baseline is lora; GaRare's claim is against GaLore, and both against full.
    results = _runs("lora", (0.70, 0.71, 0.72))
    results += _runs("galore", (0.80, 0.81, 0.82), optimizer_state_bytes=100.0 * 2**20)
    results += _runs("garare", (0.79, 0.80, 0.81), optimizer_state_bytes=60.0 * 2**20)
    results += _runs("full", (0.75, 0.83, 0.80), rank=None, optimizer_state_bytes=300.0 * 2**20)
    claims, text = _claims(tmp_path, results)
    by = {(c["method"], c["baseline"]): c for c in claims}
    garare = by[("garare", "galore")]
    assert garare["final"]["diffs"] == pytest.approx([-0.01, -0.01, -0.01])
    assert garare["quality"] == "not reproduced (worse)"
    assert garare["cost"]["ratio"] == pytest.approx(0.6) and garare["cost"]["holds"]
    # garare - full = 0.04, -0.03, 0.01: not separable; a rank against full's "-".
    vs_full = by[("garare", "full")]
    assert (vs_full["rank"], vs_full["baseline_rank"]) == ("8", "-")
    assert vs_full["final"]["diffs"] == pytest.approx([0.04, -0.03, 0.01])
    assert vs_full["quality"] == "not separable"
    assert vs_full["cost"]["ratio"] == pytest.approx(0.2)
    row = _row(text, "| `garare` r8 matches `full` |")
    assert "optimizer state 0.200x (-240.0 MiB; holds)" in row
    row = _row(text, "| `garare` matches `galore` |")
    assert "optimizer state 0.600x (-40.0 MiB; holds)" in row
    # The main table still pairs with lora.
    assert "| garare | 8 | 0.001 | 3 |" in text and "Δ best vs lora" in text


def test_a_side_at_the_no_learning_score_compares_nothing(tmp_path: Path) -> None:
    results = _runs("lora", (0.80, 0.82, 0.84))
    # Asymmetric predicts the majority class on seed 1 at the end of the run.
    results += [_run("asymmetric", 0, 0.81), _run("asymmetric", 1, 0.6838),
                _run("asymmetric", 2, 0.83)]
    claims, text = _claims(tmp_path, results)
    (asym,) = claims
    assert asym["quality"] == "compares nothing"
    assert asym["floor"] == "`asymmetric` ends at the no-learning score on 1 of 3 seeds"
    assert "compares nothing (`asymmetric` ends at the no-learning score on 1 of 3 seeds)" in (
        _row(text, "| `asymmetric` matches `lora` |"))
    # Without a reference there is no floor to call.
    claims, _ = _claims(tmp_path / "nofloor", results, reference=None)
    assert claims[0]["quality"] != "compares nothing" and claims[0]["floor"] == ""


def test_one_seed_gives_no_verdict_and_lower_is_better_flips_the_side() -> None:
    one = _runs("lora", (0.8,)) + _runs("stella", (0.9,))
    paired = [*report.paired_differences(one, "lora", field="final"),
              *report.paired_differences(one, "lora", field="best")]
    (c,) = check_claims(one, paired)
    assert c["quality"] == "one seed: no interval"
    # A loss-like metric (lower is better): stella 0.1 below lora on every seed is better.
    low = [{**r, "mode": "min"} for r in _runs("lora", (1.0, 1.1, 1.2))
           + _runs("stella", (0.9, 1.0, 1.1))]
    paired = [*report.paired_differences(low, "lora", mode="min", field="final"),
              *report.paired_differences(low, "lora", mode="min", field="best")]
    (c,) = check_claims(low, paired, mode="min")
    assert c["final"]["mean"] == pytest.approx(-0.1) and c["quality"] == "reproduced"
    parity = Claim("stella", "lora", "parity", "test")
    (c,) = check_claims(low, paired, mode="min", claims=[parity])
    assert c["quality"] == "reproduced (better)"


def test_every_claim_names_shipped_fragments() -> None:
    fragments = {p.stem for p in (Path(__file__).parents[1] / "configs/methods").glob("*.yaml")}
    for claim in CLAIMS:
        assert {claim.method, claim.baseline} <= fragments, claim
        assert claim.quality in ("better", "parity")
        assert claim.cost_field in (None, "optimizer_state_bytes", "trainable_params")
    assert len({(c.method, c.baseline) for c in CLAIMS}) == len(CLAIMS)


def test_faster_training_is_steps_to_the_baselines_final_loss(tmp_path: Path) -> None:
    # LoRA's loss falls linearly from 1.0 to 0.5 over 100 steps; Manifold-LoRA (Stiefel) walks
    # the same curve twice as fast on seed 0 and stays at 0.9 on seed 1.
    line = [1.0 - 0.5 * i / 99 for i in range(100)]
    steps = list(range(1, 101))
    fast = [line[min(2 * i, 99)] for i in range(100)]
    results = [_run("lora", s, 0.8, loss_curve={"step": steps, "loss": line}) for s in (0, 1)]
    results += [_run("manifold_stiefel", 0, 0.8, loss_curve={"step": steps, "loss": fast}),
                _run("manifold_stiefel", 1, 0.8, loss_curve={"step": steps, "loss": [0.9] * 100})]
    # Trailing mean over 10 points: LoRA's last is the mean of line[90..99] = 1 - 0.5 * 94.5 /
    # 99, first reached at its last step (100). The fast curve's window at index 53 covers
    # line[88, 90, ..., 98] and line[99] four times: mean index 95.4 >= 94.5; at index 52,
    # 94.1 < 94.5. So step 54, ratio 0.54.
    assert steps_to_loss({"step": steps, "loss": line}, 1.0 - 0.5 * 94.5 / 99 + 1e-12) == 100
    assert steps_to_loss({"step": steps, "loss": fast}, 1.0 - 0.5 * 94.5 / 99 + 1e-12) == 54
    claims, text = _claims(tmp_path, results)
    (c,) = claims
    assert c["speed"]["ratios"] == [pytest.approx(0.54), None]
    assert (c["speed"]["reached"], c["speed"]["n"], c["speed"]["holds"]) == (1, 2, False)
    assert "steps to the baseline's loss 0.54x (does not hold; not reached on 1 of 2 seeds)" in (
        _row(text, "| `manifold_stiefel` better than `lora` |"))
    claims, _ = _claims(tmp_path / "one", results[:1] + results[2:3])
    assert claims[0]["speed"]["holds"] is True
    assert next(c for c in CLAIMS if c.method == "stella").faster is False
