"""Image classification for domain generalisation (DomainBed sets, DomainNet) over
``AutoModelForImageClassification`` (ViT)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoImageProcessor, AutoModelForImageClassification

from app.adapters import AdapterConfig
from app.errors import ConfigError
from app.metrics.domains import GroupAccuracy
from app.modules.adapted import AdaptedModule, default_optimizer, default_scheduler
from app.precision import DtypeOption

log = logging.getLogger(__name__)

#: Domains (or test dataloaders) counted when the names are not linked (module used alone).
MAX_DOMAINS = 16

class ImageClassifierFactory:
    """``AutoModelForImageClassification`` that always gets a head of the configured size.

    A pretrained checkpoint with another head (ImageNet's 1000 classes) or none (the in21k
    ViT backbones) loads with a freshly initialised ``classifier`` of ``num_labels`` outputs:
    ``from_pretrained`` is called with ``ignore_mismatched_sizes=True``.
    """

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> torch.nn.Module:
        """Build a randomly initialised model (used on the meta device for start-up checks)."""
        return AutoModelForImageClassification.from_config(config, **kwargs)

    @staticmethod
    def from_pretrained(source: str, **kwargs: Any) -> torch.nn.Module:
        """Load the pretrained backbone; a head of another size is replaced, not an error."""
        kwargs.setdefault("ignore_mismatched_sizes", True)
        return AutoModelForImageClassification.from_pretrained(source, **kwargs)


class ImageClassificationModule(AdaptedModule):
    """Fine-tunes an image classifier (ViT) on leave-domains-out data with any adapter.

    The classifier head is trained by every method (PEFT ``modules_to_save``). An adapter whose
    ``target_modules`` is null gets the query and value projections (``q_proj``, ``v_proj`` for
    transformers 5.x ViT; :func:`app.adapters.targets.with_default_targets`), the Asymmetry
    paper's vision setting, so every method fragment runs unchanged.

    Logged: ``train/loss``, ``train/lr``; ``val/loss``, ``val/acc`` (pooled hold-out of the
    training domains), ``val/acc/<domain>`` per training domain and ``val/score`` (=
    ``val/acc``, what checkpointing monitors); ``test/loss/<domain>``, ``test/acc/<domain>``
    for each test domain (one test dataloader each), ``test/acc_avg`` (their unweighted mean,
    DomainBed's average over held-out domains) and ``test/score`` (= ``test/acc_avg``).

    Args:
        checkpoint: Base model (hub id such as ``google/vit-base-patch16-224-in21k``, local
            folder or ``pkg:<module>``); a head of another size is replaced by a fresh one.
        task: Dataset name (``pacs``, ``vlcs``, ...); linked from ``data.init_args.task``.
        num_labels: Number of classes; linked from the data module at instantiation.
        class_names: Class names (label ``i`` is ``class_names[i]``), written to the model
            config as ``id2label``; linked from the data module. ``None``: ``LABEL_<i>``.
        domain_names: All domain names, indexed by a batch's ``domain``; linked from the data
            module. ``None``: per-domain validation accuracy is logged as ``domain<i>``.
        test_domains: Test domains in test-dataloader order; linked from
            ``data.init_args.test_domains``. ``None``: logged as ``test<i>``.
        adapter: See :class:`app.modules.adapted.AdaptedModule`.
        optimizer: See :class:`app.modules.adapted.AdaptedModule`.
        scheduler: See :class:`app.modules.adapted.AdaptedModule`.
        head_lr: See :class:`app.modules.adapted.AdaptedModule`.

    Raises:
        ConfigError: For ``num_labels < 2``, class names that disagree with ``num_labels``, or
            a null ``target_modules`` on a model without recognisable query / value layers.
        dtype: See :class:`app.modules.adapted.AdaptedModule` (the frozen base's dtype).
        attn_implementation: See :class:`app.modules.adapted.AdaptedModule`.
        gradient_checkpointing: See :class:`app.modules.adapted.AdaptedModule`.
    """

    def __init__(
        self,
        checkpoint: str = "google/vit-base-patch16-224-in21k",
        task: str = "pacs",
        num_labels: int = 7,
        class_names: list[str] | None = None,
        domain_names: list[str] | None = None,
        test_domains: list[str] | None = None,
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        head_lr: float | None = None,
        dtype: DtypeOption = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        if num_labels < 2:
            raise ConfigError(f"model.init_args.num_labels={num_labels}: need at least 2 classes")
        if class_names is not None and len(class_names) != num_labels:
            raise ConfigError(
                f"model.init_args.class_names has {len(class_names)} names but num_labels is "
                f"{num_labels}; leave both to the data links"
            )
        names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_labels)]
        super().__init__(
            checkpoint, adapter, optimizer, scheduler,
            model_class=ImageClassifierFactory, preprocessor_class=AutoImageProcessor,
            head_lr=head_lr,
            config_kwargs={"num_labels": num_labels,
                           "problem_type": "single_label_classification",
                           "id2label": dict(enumerate(names)),
                           "label2id": {name: i for i, name in enumerate(names)}},
            dtype=dtype, attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing)
        self.task = task
        self.num_labels = num_labels
        self.class_names = list(class_names) if class_names is not None else None
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.test_domains = list(dict.fromkeys(test_domains)) if test_domains else None
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # micro = plain accuracy (torchmetrics' default for multiclass is macro).
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_domain_acc = GroupAccuracy(len(self.domain_names or ()) or MAX_DOMAINS)
        self.test_acc = GroupAccuracy(len(self.test_domains or ()) or MAX_DOMAINS)

    # -- names ----------------------------------------------------------------------------
    def test_domain_name(self, index: int) -> str:
        """Name of test dataloader ``index``."""
        if self.test_domains is not None and index < len(self.test_domains):
            return self.test_domains[index]
        return f"test{index}"

    def domain_name(self, index: int) -> str:
        """Name of domain index ``index`` (a batch's ``domain`` value)."""
        if self.domain_names is not None and index < len(self.domain_names):
            return self.domain_names[index]
        return f"domain{index}"

    # -- steps ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        assert self.model is not None
        inputs = {"pixel_values": batch["pixel_values"]}
        if "labels" in batch:
            inputs["labels"] = batch["labels"]
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self(batch)
        labels, preds = batch["labels"], out.logits.argmax(-1)
        self.val_acc.update(preds, labels)
        self.val_domain_acc.update(preds, labels, batch["domain"])
        self.log("val/loss", out.loss, batch_size=labels.shape[0], add_dataloader_idx=False,
                 sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self(batch)
        labels = batch["labels"]
        self.test_acc.update(out.logits.argmax(-1), labels, torch.full_like(labels, dataloader_idx))
        self.log(f"test/loss/{self.test_domain_name(dataloader_idx)}", out.loss,
                 batch_size=labels.shape[0], add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.log("val/acc", acc, add_dataloader_idx=False)
        self.log("val/score", acc, prog_bar=True, add_dataloader_idx=False)
        # nan: a domain without validation images. torchmetrics squeezes a one-element
        # result to a scalar, hence the reshape.
        per_domain = self.val_domain_acc.compute().reshape(-1)
        for index in torch.nonzero(~per_domain.isnan()).flatten().tolist():
            self.log(f"val/acc/{self.domain_name(index)}", per_domain[index],
                     add_dataloader_idx=False)
        self.val_acc.reset()
        self.val_domain_acc.reset()

    def on_test_epoch_end(self) -> None:
        per_domain = self.test_acc.compute().reshape(-1)
        seen = torch.nonzero(~per_domain.isnan()).flatten().tolist()
        for index in seen:
            self.log(f"test/acc/{self.test_domain_name(index)}", per_domain[index],
                     add_dataloader_idx=False)
        if seen:
            average = per_domain[seen].mean()
            self.log("test/acc_avg", average, add_dataloader_idx=False)
            self.log("test/score", average, prog_bar=True, add_dataloader_idx=False)
        self.test_acc.reset()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = self({"pixel_values": batch["pixel_values"]})
        return {"predictions": out.logits.argmax(-1).cpu(),
                "labels": batch.get("labels", torch.empty(0)).cpu(),
                "domain": batch.get("domain", torch.empty(0)).cpu()}
