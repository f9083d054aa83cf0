"""The score a model reaches without learning anything: the floor every table and plot shows.

For a GLUE classification task it is the majority class of the training set, predicted for
every dev (or held-out) row and scored with the task's own metrics; its loss is the
cross-entropy of predicting the training label prior (the entropy of the prior), the training
loss a model that ignores its input converges to. For the STS-B regression a constant
prediction has no correlation (Pearson and Spearman are undefined; shown as 0.0) and its loss
is the variance of the training scores (predicting their mean).

Only local GLUE data (``data.init_args.data_dir`` with the official TSVs) is read; for other
data modules or hub data there is no reference (``None``), and the tables say so.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["chance_reference"]

_GLUE = "GLUEDataModule"


def _data_args(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    data = config.get("data") or {}
    if not isinstance(data, dict):
        return "", {}
    return str(data.get("class_path", "")), dict(data.get("init_args") or {})


def _score(task: Any, labels: list[int], prediction: int) -> dict[str, float]:
    import torch

    from app.metrics.glue import glue_metrics

    metrics = glue_metrics(task.name)
    target = torch.tensor(labels)
    metrics.update(torch.full_like(target, prediction), target)
    return {k: float(v) for k, v in metrics.compute().items()}


def chance_reference(config: dict[str, Any], root: Path | None = None,
                     holdout: tuple[float, int] | None = None) -> dict[str, Any] | None:
    """The no-learning reference of the merged base config's GLUE task.

    Args:
        config: The merged base fragments (``data.class_path`` / ``init_args``).
        root: Folder that relative ``data_dir`` paths are resolved against (default: cwd).
        holdout: ``(fraction, seed)`` to score the held-out slice of the training set that
            learning-rate selection validates on (:func:`app.data.glue.holdout_split`), the
            majority taken over the remaining training rows.

    Returns:
        ``{"kind", "task", "metrics": {"val/score", "val/<metric>", ...}, "train_loss",
        "n_eval", "headline" (the metric ``val/score`` is), "description"}``, or ``None``
        when the data are not local GLUE files.
    """
    from app.data.glue_formats import get_task, local_split_files, read_glue_tsv

    class_path, args = _data_args(config)
    if class_path.rsplit(".", 1)[-1] != _GLUE or not args.get("data_dir"):
        return None
    data_dir = Path(args["data_dir"]).expanduser()
    if not data_dir.is_absolute() and root is not None:
        data_dir = root / data_dir
    if not data_dir.is_dir():
        return None
    task = get_task(str(args.get("task", "rte")))
    files = local_split_files(task, data_dir)
    train = read_glue_tsv(task, files["train"])[0]["label"]
    if holdout is not None:
        from app.data.glue import holdout_split

        kept, held = holdout_split(len(train), *holdout)
        evals = [[train[i] for i in held]]
        train = [train[i] for i in kept]
    else:
        evals = [read_glue_tsv(task, files[s])[0]["label"] for s in task.validation_splits]
    labels = evals[0]  # the headline split (MNLI: matched)
    if task.is_regression:
        mean = sum(train) / len(train)
        variance = sum((y - mean) ** 2 for y in train) / len(train)
        metrics = {"val/pearson": 0.0, "val/spearman": 0.0, "val/score": 0.0}
        return {"kind": "constant", "task": task.name, "metrics": metrics,
                "train_loss": variance, "n_eval": len(labels), "headline": task.headline,
                "description": f"constant prediction (train mean {mean:.3f}): no correlation, "
                               "shown as 0"}
    counts = Counter(train)
    majority = max(sorted(counts), key=lambda c: counts[c])
    metrics = {f"val/{k}": v for k, v in _score(task, labels, majority).items()}
    metrics["val/score"] = metrics[f"val/{task.headline}"]
    entropy = -sum(c / len(train) * math.log(c / len(train)) for c in counts.values())
    name = task.label_names[majority] if task.label_names else str(majority)
    return {"kind": "majority", "task": task.name, "metrics": metrics, "train_loss": entropy,
            "n_eval": len(labels), "headline": task.headline,
            "description": f"majority class of the training set ({name!r}, "
                           f"{counts[majority] / len(train):.1%} of it) predicted everywhere"}
