"""Statistics of a comparison against hand computations: t quantiles, t-intervals, the exact
paired bootstrap, the separable column, the no-learning reference in tables and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.compare import report
from app.compare.reference import chance_reference
from app.compare.stats import bootstrap_interval, separable, t_interval, t_quantile

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("df,expected", [(1, 12.706205), (2, 4.302653), (4, 2.776445),
                                         (9, 2.262157), (29, 2.045230), (10**6, 1.959966)])
def test_t_quantiles_match_the_printed_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_t_interval_by_hand() -> None:
    # d = 0.01, 0.02, 0.04: mean 0.07/3, sd = sqrt(((-1/3)^2 + (-1/3 + 1)^2 ...)) computed:
    mean = 0.07 / 3
    sd = math.sqrt(((0.01 - mean) ** 2 + (0.02 - mean) ** 2 + (0.04 - mean) ** 2) / 2)
    assert sd == pytest.approx(0.0152753, abs=1e-7)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2) from the table
    ci = t_interval([0.01, 0.02, 0.04])
    assert ci["mean"] == pytest.approx(mean)
    assert ci["half_width"] == pytest.approx(half, abs=1e-6) == pytest.approx(0.037946, abs=1e-6)
    assert (ci["low"], ci["high"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert separable(ci) == "no"  # -0.0146 .. +0.0613 contains 0
    assert separable(t_interval([0.03, 0.031, 0.029])) == "yes (higher)"
    assert separable(t_interval([-0.03, -0.031, -0.029])) == "yes (lower)"
    one = t_interval([0.05])
    assert one["mean"] == 0.05 and one["low"] is None and separable(one) == "n/a"


def test_exact_paired_bootstrap_by_hand() -> None:
    assert bootstrap_interval([0.1, 0.2, 0.3, 0.4]) is None  # fewer than 5 seeds
    # diffs 0,0,0,0,1: a resample's mean is k/5 with k ~ Binomial(5, 1/5):
    # P(k=0) = 0.32768 >= 0.025 -> lower 0.0; P(k<=2) = 0.94208 < 0.975 <= P(k<=3) = 0.99328
    # -> upper 3/5.
    boot = bootstrap_interval([0, 0, 0, 0, 1])
    assert boot["exact"] and boot["resamples"] == 5**5
    assert (boot["low"], boot["high"]) == pytest.approx((0.0, 0.6))
    same = bootstrap_interval([0.02] * 7)  # seeded Monte Carlo above 6 seeds
    assert not same["exact"] and (same["low"], same["high"]) == pytest.approx((0.02, 0.02))
    assert bootstrap_interval(list(range(8))) == bootstrap_interval(list(range(8)))


def _run(method: str, seed: int, final: float, lr: float | None = None) -> dict:
    return {"name": f"{method}-{seed}", "method": method, "rank": 8, "seed": seed, "lr": lr,
            "metric": "val/score", "mode": "max", "best": final + 0.01, "final": final,
            "loss_curve": {"step": [1, 2], "loss": [0.7, 0.6]}}


def test_report_shows_intervals_separable_and_the_no_learning_floor(tmp_path: Path) -> None:
    results = [_run("lora", s, v, 5e-4) for s, v in enumerate((0.80, 0.82, 0.84))]
    results += [_run("stella", s, v, 1e-3) for s, v in enumerate((0.81, 0.84, 0.85))]
    results += [_run("asym", s, v, 2e-3) for s, v in enumerate((0.70, 0.72, 0.74))]
    results += [_run("garare", s, v) for s, v in enumerate((0.6838, 0.6838, 0.70))]
    reference = {"kind": "majority", "task": "mrpc", "metrics": {"val/score": 0.6838},
                 "train_loss": 0.631, "n_eval": 408, "description": "majority class"}
    files = report.write_report(tmp_path, results, baseline="lora", reference=reference)
    text = files["markdown"].read_text()
    # Main table: the no-learning row and the selected rates.
    assert "| *majority (no learning)* | - | - | - | 0.6838 | 0.6838 |" in text
    assert "| lora | 8 | 0.0005 | 3 |" in text and "| stella | 8 | 0.001 | 3 |" in text
    # stella - lora final: 0.01, 0.02, 0.01 -> mean 0.013333, sd 0.0057735,
    # half 4.302653 * 0.0057735 / sqrt(3) = 0.014342.
    row = next(line for line in text.splitlines() if line.startswith("| stella | 8 | 3 | +"))
    assert "| +0.0133 | [-0.0010, +0.0277] | n/a (< 5 seeds) | no |" in row
    # asym - lora: -0.10 on every seed: sd 0, the interval is the point, separable.
    row = next(line for line in text.splitlines() if line.startswith("| asym | 8 | 3 |"))
    assert "| -0.1000 | [-0.1000, -0.1000] | n/a (< 5 seeds) | yes (lower) |" in row
    # The floor minus the baseline: 0.6838 - (0.80, 0.82, 0.84).
    row = next(line for line in text.splitlines() if line.startswith("| *no learning − lora*"))
    assert "| -0.1362 |" in row and "yes (lower)" in row
    # A method at the majority class is called out under the table.
    assert "`garare` r8 on 2 of 3 seeds" in text and "`asym`" not in text.split(
        "At the no-learning score")[1].split("\n\n")[0]
    payload = json.loads(files["json"].read_text())
    assert payload["reference"]["metrics"]["val/score"] == 0.6838
    pair = next(p for p in payload["paired_differences"]
                if p["method"] == "stella" and p["field"] == "final")
    assert pair["ci95"]["half_width"] == pytest.approx(4.302653 * 0.0057735 / math.sqrt(3),
                                                       abs=1e-5)
    for key in ("plot_metric", "plot_loss", "plot_paired"):
        assert files[key].read_bytes()[:8] == PNG


def test_majority_reference_of_the_real_mrpc_and_stsb(shared_data: Path) -> None:
    def config(task: str) -> dict:
        return {"data": {"class_path": "app.data.glue.GLUEDataModule",
                         "init_args": {"task": task, "data_dir": str(shared_data / "glue")}}}

    mrpc = chance_reference(config("mrpc"))
    # 279 of the 408 dev pairs are paraphrases (the training majority): 0.6838; F1 of always
    # "equivalent" = 2 * 279 / (2 * 279 + 129) = 0.8122.
    assert mrpc["kind"] == "majority" and mrpc["n_eval"] == 408
    assert mrpc["metrics"]["val/score"] == pytest.approx(279 / 408, abs=1e-6)
    assert mrpc["metrics"]["val/f1"] == pytest.approx(2 * 279 / (2 * 279 + 129), abs=1e-6)
    held = chance_reference(config("mrpc"), holdout=(0.1, 0))
    assert held["n_eval"] == round(0.1 * 3668)
    stsb = chance_reference(config("stsb"))
    assert stsb["kind"] == "constant" and stsb["metrics"]["val/score"] == 0.0
    assert 2.0 < stsb["train_loss"] < 2.3  # the variance of the training scores
    assert chance_reference({"data": {"class_path": "x.Other"}}) is None
