"""GLUE metrics per task, as torchmetrics collections (one per stage and validation split)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from app.data.glue_formats import get_task


def glue_metrics(task: str) -> MetricCollection:
    """The official metrics of a GLUE task.

    CoLA: Matthews correlation (``mcc``) and accuracy; STS-B: Pearson and Spearman correlation;
    MRPC and QQP: F1 of the positive class and accuracy; MNLI: 3-class accuracy (the module
    keeps one collection for matched and one for mismatched); SST-2, QNLI, RTE, WNLI: accuracy.

    Args:
        task: A GLUE task name.

    Returns:
        A collection that takes predictions (class ids, or scores for STS-B) and targets.
    """
    spec = get_task(task)
    if spec.is_regression:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if spec.num_labels > 2:
        return MetricCollection(
            {"accuracy": MulticlassAccuracy(num_classes=spec.num_labels, average="micro")}
        )
    metrics = {"accuracy": BinaryAccuracy()}
    if spec.name == "cola":
        metrics["mcc"] = BinaryMatthewsCorrCoef()
    if spec.name in ("mrpc", "qqp"):
        metrics["f1"] = BinaryF1Score()
    return MetricCollection(metrics)
