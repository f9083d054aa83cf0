"""Every GLUE metric against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from app.metrics.glue import glue_metrics


def test_cola_matthews_by_hand() -> None:
    preds = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    target = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    tp, tn, fp, fn = 3, 2, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = glue_metrics("cola")(preds, target)
    assert out["mcc"].item() == pytest.approx(mcc, abs=1e-6)
    assert out["accuracy"].item() == pytest.approx(5 / 8)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_by_hand(task: str) -> None:
    preds = torch.tensor([1, 1, 1, 0, 0, 1])
    target = torch.tensor([1, 0, 1, 1, 0, 1])
    tp, fp, fn = 3, 1, 1
    f1 = 2 * tp / (2 * tp + fp + fn)
    out = glue_metrics(task)(preds, target)
    assert out["f1"].item() == pytest.approx(f1)
    assert out["accuracy"].item() == pytest.approx(4 / 6)


def test_stsb_pearson_spearman_by_hand() -> None:
    x = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.7])
    y = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])
    xm, ym = x - x.mean(), y - y.mean()
    pearson = (xm * ym).sum() / (xm.norm() * ym.norm())
    rx = torch.tensor([1.0, 3, 2, 5, 4])  # ranks of x
    ry = torch.tensor([1.0, 2, 3, 5, 4])
    d2 = ((rx - ry) ** 2).sum()
    spearman = 1 - 6 * d2 / (5 * (25 - 1))
    out = glue_metrics("stsb")(x, y)
    assert out["pearson"].item() == pytest.approx(pearson.item(), abs=1e-6)
    assert out["spearman"].item() == pytest.approx(spearman.item(), abs=1e-6)


def test_mnli_three_class_accuracy() -> None:
    out = glue_metrics("mnli")(torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 1, 1, 2, 0]))
    assert set(out) == {"accuracy"}
    assert out["accuracy"].item() == pytest.approx(3 / 5)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_only_tasks(task: str) -> None:
    out = glue_metrics(task)(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0]))
    assert set(out) == {"accuracy"}
    assert out["accuracy"].item() == pytest.approx(0.5)


def test_metrics_accumulate_over_batches() -> None:
    """Epoch-level values equal the value over the concatenated batches."""
    metric = glue_metrics("cola")
    preds = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    target = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    metric.update(preds[:3], target[:3])
    metric.update(preds[3:], target[3:])
    whole = glue_metrics("cola")(preds, target)
    assert metric.compute()["mcc"].item() == pytest.approx(whole["mcc"].item())
