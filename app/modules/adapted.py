"""The Lightning wiring every task module shares: a Hugging Face model plus a method, an
injected optimizer and schedule, adapter-only checkpoints, start-up checks and export.

A task module (classification, question answering, images) subclasses :class:`AdaptedModule`,
passes its ``AutoModelFor*`` class and config arguments to ``super().__init__`` and adds its
steps and metrics; nothing else. The work itself is done by the plain functions of
:mod:`app.modules.core` and by the method (:mod:`app.adapters.contract`): which parameters are
trained, kept out of weight decay, checkpointed and exported, which strategies and precisions
are refused (:mod:`app.adapters.checks`), and which callbacks the method needs
(:meth:`AdaptedModule.configure_callbacks` names a missing one at start-up).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftConfig
from transformers import AutoConfig, AutoTokenizer

from app import precision
from app.adapters import head_module_names
from app.adapters.checks import check_trainer, missing_callbacks
from app.adapters.contract import AdapterConfig, Method
from app.atomic import atomic_folder
from app.errors import ConfigError, is_positive_number
from app.hub import load_pretrained, resolve_checkpoint
from app.modules import core
from app.modules.core import count_parameters  # noqa: F401  (re-exported for callers)
from app.optim.schedules import WarmupDecay
from app.precision import DtypeOption


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW, lr 2e-4, weight decay 0.01: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)


def default_scheduler(optimizer: torch.optim.Optimizer) -> WarmupDecay:
    """Linear warm-up over 6% of the steps, then linear decay to zero."""
    return WarmupDecay(optimizer, warmup=0.06)


class AdaptedModule(L.LightningModule):
    """Base of the task modules (one level; everything it does is a call into
    :mod:`app.modules.core` or the method).

    Args:
        checkpoint: Base model: hub id, local folder, or ``pkg:<module>`` (see
            :func:`app.hub.resolve_checkpoint`).
        adapter: ``None`` for full fine-tuning (or GaLore / GaRare, which live in the
            optimizer), a ``peft`` config (``class_path: peft.LoraConfig``) or one of
            ``app.adapters``' configs (LoRA+ is ``app.adapters.loraplus.LoraPlusConfig``).
        optimizer: Optimizer factory; receives named parameter groups (weight decay off for
            biases, norms and the method's ``no_decay`` factors). Default AdamW(lr=2e-4,
            wd=0.01).
        scheduler: Schedule factory, stepped every optimizer step; if it has
            ``set_total_steps`` it is told ``trainer.estimated_stepping_batches``.
        model_class: Set by the task module: the transformers ``AutoModelFor*`` class (or
            any object with ``from_config`` / ``from_pretrained``).
        config_kwargs: Set by the task module: extra ``AutoConfig.from_pretrained``
            arguments (labels, problem type).
        preprocessor_class: Set by the task module: what is saved beside an export
            (``AutoTokenizer``; image modules ``AutoImageProcessor``).
        head_lr: Learning rate of the task head (:meth:`head_modules`: the pooler and
            classifier) for every method; ``None`` (default) trains it at the optimizer's
            rate, as the papers do. The schedule scales it like every other rate.
        dtype: How the frozen base is kept (:mod:`app.precision`): ``auto`` (default) the
            checkpoint's saved dtype under ``*-mixed`` precisions and fp32 under
            ``32-true``; or ``float32``, ``bfloat16``, ``float16``. Trainable tensors are
            fp32 masters whatever this says (``bf16-true`` trains bf16 weights).
        attn_implementation: The attention kernel transformers uses (``sdpa``, ``eager``,
            ``flash_attention_2``, ...); ``None`` (default) keeps transformers' choice.
        gradient_checkpointing: Recompute each layer's activations in the backward pass
            (the model's own non-reentrant checkpointing): less activation memory for
            about a third more compute; the same gradients.
    """

    def __init__(
        self,
        checkpoint: str,
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        *,
        model_class: Any,
        config_kwargs: dict[str, Any] | None = None,
        preprocessor_class: Any = AutoTokenizer,
        head_lr: float | None = None,
        dtype: DtypeOption = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        precision.check_dtype(dtype, None)
        if attn_implementation is not None and not (isinstance(attn_implementation, str)
                                                    and attn_implementation.strip()):
            raise ConfigError(f"model.init_args.attn_implementation={attn_implementation!r}: "
                              "give a name such as sdpa or eager, or null")
        self.dtype_option: str = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if head_lr is not None and not is_positive_number(head_lr):
            raise ConfigError(f"model.init_args.head_lr={head_lr!r}: give a learning rate > 0 "
                              "(or null to train the head at the optimizer's rate)")
        self.head_lr = None if head_lr is None else float(head_lr)
        self._heads: list[str] = []  # set by configure_model
        self.checkpoint = checkpoint
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model_class = model_class
        self.preprocessor_class = preprocessor_class
        self.model: torch.nn.Module | None = None
        # Adapter-only checkpoints: the frozen base is reloaded from `checkpoint`.
        self.strict_loading = False
        self._state_keys: frozenset[str] | None = None  # set by configure_model
        self._param_ndims: dict[str, int] = {}  # set by configure_model
        self.hf_config = load_pretrained(AutoConfig, checkpoint, **(config_kwargs or {}))
        #: The adapter as applied (a null ``target_modules`` filled on a copy) and its method.
        self.adapter, self.method = core.prepare_method(model_class, self.hf_config, adapter,
                                                        optimizer)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Modules every method trains in full (new task heads); causal LMs have none."""
        return head_module_names(model)

    # -- model ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Refuse what the method cannot run with (under a Trainer), then load the pretrained
        model and apply the method (once)."""
        compute = None
        if self._trainer is not None:
            check_trainer(self.method.spec, self._trainer, type(self).__name__)
            compute = str(self._trainer.precision)
        if self.model is not None:
            return
        self.model, heads = core.build_model(
            self.model_class, self.checkpoint, self.hf_config, self.method, self.head_modules,
            precision=compute, dtype=self.dtype_option,
            attn_implementation=self.attn_implementation,
            gradient_checkpointing=self.gradient_checkpointing)
        self._heads = list(heads)
        # Fixed here, before a strategy wraps the model: FSDP renames parameters
        # (`_fsdp_wrapped_module.`) and its state_dict hooks are collectives.
        self._state_keys = core.trainable_state_keys(self.model, self.method.spec)
        # FSDP1 (use_orig_params) shows the optimizer flat 1-D shards: keep the real ranks.
        self._param_ndims = {n: p.ndim for n, p in self.model.named_parameters()}
        trainable, total = core.count_parameters(self.model)
        rank_zero_info(
            f"parameters: trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
            f" | adapter {type(self.adapter).__name__ if self.adapter else 'none (full FT)'}"
            f" | heads {heads}" + ("" if self.head_lr is None or not heads
                                   else f" at lr {self.head_lr:g}")
        )
        rank_zero_info(precision.describe(self.model, compute, self.dtype_option)
                       + (" | activation checkpointing on" if self.gradient_checkpointing
                          else ""))

    def check_strategy(self, strategy: object) -> None:
        """Refuse a strategy the method or this module cannot train with
        (:func:`app.adapters.checks.check_strategy`).

        Raises:
            ConfigError: Naming the strategy and what to use instead.
        """
        from app.adapters.checks import check_strategy

        check_strategy(self.method.spec, strategy, type(self).__name__)

    def configure_callbacks(self) -> list[L.Callback]:
        """Say at the start of ``fit`` which callbacks the method needs and the run lacks
        (the run goes on: a control run without the constraint is a legitimate choice)."""
        if self.trainer.state.fn == "fit":
            for path in missing_callbacks(self.method.spec, self.method.constraint(),
                                          self.trainer.callbacks):
                rank_zero_warn(f"{self.method.spec.name} needs trainer.callbacks class_path "
                               f"{path}; without it the method is trained without its "
                               "constraint / update rule (configs/methods/ lists it)")
        return []

    @property
    def trainable_state_keys(self) -> set[str]:
        """``state_dict`` keys a checkpoint holds (see :func:`app.adapters.adapter_state_keys`)."""
        assert self.model is not None
        if self._state_keys is not None:
            return set(self._state_keys)
        return set(core.trainable_state_keys(self.model, self.method.spec))

    def check_checkpoint_keys(self, stored: set[str]) -> None:
        """Raise if a checkpoint's ``state_dict`` keys are not exactly this module's.

        Raises:
            ConfigError: Naming missing and unexpected keys.
        """
        expected = self.trainable_state_keys
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            raise ConfigError(
                "checkpoint does not match this model and adapter: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); resume with the same method and model config"
            )

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.model is not None
        optimizer = self.method.build_optimizer(self.model, self.optimizer_factory,
                                                self.parameter_groups())
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups (:func:`app.modules.core.parameter_groups`)."""
        assert self.model is not None
        return core.parameter_groups(self.model, self.method.spec.no_decay, self._param_ndims,
                                     self._heads, self.head_lr)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Every rank writes checkpoints together, so the gather inside is safe.
        checkpoint["rng_states"] = core.rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is None:
            self.configure_model()
        # FSDP loads the weights itself and passes the rest without `state_dict`; its keys
        # are checked by app.strategies.AdapterFSDPStrategy.load_checkpoint.
        if "state_dict" in checkpoint:
            self.check_checkpoint_keys(set(checkpoint["state_dict"]))
        if "rng_states" in checkpoint and self._trainer is not None and (
                self.trainer.state.fn == "fit"):
            core.restore_rng_states(checkpoint["rng_states"], self.trainer.global_rank,
                                    self.trainer.world_size)

    # -- export ---------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike, tokenizer_source: str | None = None
                     ) -> Path:
        """Write the trained part for reuse outside this project (the method's ``export``:
        PEFT format for adapters, a complete model for full fine-tuning) with the model config
        and the tokenizer (or image processor) beside it. The folder appears atomically: it is
        written under a temporary name and renamed.

        Returns:
            The folder written.
        """
        assert self.model is not None
        target = Path(directory)
        with atomic_folder(target) as tmp:
            self.method.export(self.model, tmp, resolve_checkpoint(self.checkpoint))
            core.save_preprocessor(tmp, tokenizer_source or self.checkpoint,
                                   self.preprocessor_class)
        return target

    def save_adapter_from_state_dict(self, directory: str | os.PathLike,
                                     state_dict: Mapping[str, torch.Tensor],
                                     tokenizer_source: str | None = None) -> Path:
        """:meth:`save_adapter` for strategies that wrap and shard the model (FSDP).

        There the model holds only shards and its ``state_dict`` is a collective, so the
        caller gathers the full state dict on every rank (``strategy.
        lightning_module_state_dict()``) and calls this on rank 0: the model is rebuilt
        unwrapped from its source, given the gathered trained weights and exported.

        Args:
            directory: As for :meth:`save_adapter`.
            state_dict: The module's full state dict (keys ``model.``...); at least every
                key of :attr:`trainable_state_keys`.
            tokenizer_source: As for :meth:`save_adapter`.

        Returns:
            The folder written.
        """
        missing = sorted(self.trainable_state_keys - set(state_dict))
        if missing:
            raise RuntimeError(f"save_adapter_from_state_dict: the state dict lacks {len(missing)}"
                               f" trained tensors (e.g. {missing[:3]}); gather it on every rank")
        wrapped = self.model
        self.model = None
        try:
            self.configure_model()
            assert self.model is not None
            weights = {k[len("model."):]: v for k, v in state_dict.items()
                       if k in self.trainable_state_keys}
            self.model.load_state_dict(weights, strict=False)
            return self.save_adapter(directory, tokenizer_source)
        finally:
            self.model = wrapped


__all__ = ["AdaptedModule", "Method", "default_optimizer", "default_scheduler"]
