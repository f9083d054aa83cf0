"""What every task module shares: a Hugging Face model plus an adapter, an injected optimizer
and schedule, adapter-only checkpoints and PEFT export.

Task modules (classification, question answering, images) subclass :class:`AdaptedModule` and
implement :meth:`AdaptedModule.build_model` and their steps and metrics. One level of
inheritance only; the adapter logic itself lives in :mod:`app.adapters` as functions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftConfig, PeftModel

from app.adapters import (
    AdapterConfig,
    adapter_state_keys,
    apply_adapter,
    check_adapter,
    head_module_names,
)
from app.adapters.targets import fill_default_targets
from app.atomic import atomic_folder
from app.errors import ConfigError
from app.hub import load_pretrained, resolve_checkpoint
from app.optim.compat import check_optimizer_adapter, check_optimizer_strategy
from app.optim.schedules import WarmupDecay

log = logging.getLogger(__name__)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW, lr 2e-4, weight decay 0.01: the default when the YAML names no optimizer."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)


def default_scheduler(optimizer: torch.optim.Optimizer) -> WarmupDecay:
    """Linear warm-up over 6% of the steps, then linear decay to zero."""
    return WarmupDecay(optimizer, warmup=0.06)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _no_decay(name: str, ndim: int, patterns: tuple[str, ...]) -> bool:
    return ndim < 2 or any(p in name for p in patterns)


#: Name parts that FSDP1 / activation checkpointing insert into wrapped parameters' names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped_name(name: str) -> str:
    """``name`` without the wrapper parts FSDP adds (the name before the model was wrapped)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _rng_states() -> dict[str, Any]:
    """This process's global random states (CPU, and CUDA once initialised)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


class AdaptedModule(L.LightningModule):
    """Base of the task modules.

    Args:
        checkpoint: Base model: hub id, local folder, or ``pkg:<module>`` (see
            :func:`app.hub.resolve_checkpoint`).
        adapter: ``None`` for full fine-tuning, a ``peft`` config (``class_path:
            peft.LoraConfig``) or one of ``app.adapters``' configs.
        optimizer: Optimizer factory; receives named parameter groups (weight decay off for
            biases, norms and ``no_decay_patterns``). Default AdamW(lr=2e-4, wd=0.01).
        scheduler: Schedule factory, stepped every optimizer step; if it has
            ``set_total_steps`` it is told ``trainer.estimated_stepping_batches``.
        loraplus_lr_ratio: If set, build the optimizer with PEFT's LoRA+ factory
            (``peft.optimizers.create_loraplus_optimizer``): B factors get this multiple of
            the optimizer's learning rate.
    """

    #: Parameter-name substrings kept out of weight decay (adapters extend this).
    no_decay_patterns: tuple[str, ...] = ()

    def __init__(
        self,
        checkpoint: str,
        adapter: PeftConfig | AdapterConfig | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loraplus_lr_ratio = loraplus_lr_ratio
        if loraplus_lr_ratio is not None and not isinstance(adapter, PeftConfig):
            raise ConfigError("model.init_args.loraplus_lr_ratio needs a PEFT LoRA adapter")
        self.model: torch.nn.Module | None = None
        # Adapter-only checkpoints: the frozen base is reloaded from `checkpoint`.
        self.strict_loading = False
        self._initial_adapter_dir: tempfile.TemporaryDirectory | None = None
        self._state_keys: frozenset[str] | None = None  # set by configure_model
        self._param_ndims: dict[str, int] = {}  # set by configure_model
        self.hf_config = load_pretrained(self.config_class(), checkpoint, **self.config_kwargs())
        with torch.device("meta"):
            meta_model = self.model_class().from_config(self.hf_config)
            fill_default_targets(meta_model, adapter)
            check_adapter(meta_model, adapter)
            check_optimizer_adapter(optimizer, adapter, meta_model)

    # -- subclass interface ---------------------------------------------------------------
    def model_class(self) -> Any:
        """The transformers ``AutoModelFor*`` class of the task."""
        raise NotImplementedError

    def config_class(self) -> Any:
        """The transformers config factory (``AutoConfig``)."""
        from transformers import AutoConfig

        return AutoConfig

    def config_kwargs(self) -> dict[str, Any]:
        """Extra ``AutoConfig.from_pretrained`` arguments (labels, problem type)."""
        return {}

    # -- model ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the pretrained model and apply the adapter (once).

        Under a Trainer, first refuse strategies this module cannot run with (see
        :meth:`check_strategy`), before anything is loaded.
        """
        if self._trainer is not None:
            self.check_strategy(self._trainer.strategy)
        if self.model is not None:
            return
        base = load_pretrained(self.model_class(), self.checkpoint, config=self.hf_config)
        heads = head_module_names(base)
        self.model = apply_adapter(base, self.adapter, heads)
        self.model.train()  # from_pretrained returns eval mode; dropout must be on for fit
        self._keep_initial_adapter()
        # Fixed here, before a strategy wraps the model: FSDP renames parameters
        # (`_fsdp_wrapped_module.`) and its state_dict hooks are collectives.
        self._state_keys = frozenset(f"model.{k}" for k in adapter_state_keys(self.model))
        # FSDP1 (use_orig_params) shows the optimizer flat 1-D shards: keep the real ranks.
        self._param_ndims = {n: p.ndim for n, p in self.model.named_parameters()}
        trainable, total = count_parameters(self.model)
        rank_zero_info(
            f"parameters: trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
            f" | adapter {type(self.adapter).__name__ if self.adapter else 'none (full FT)'}"
            f" | heads {heads}"
        )

    def _keep_initial_adapter(self) -> None:
        """PiSSA / OLoRA change the base weights; PEFT converts them to plain LoRA at save time
        from the initial adapter, which is kept here (it is recomputed on every rebuild)."""
        init = getattr(self.adapter, "init_lora_weights", True)
        if isinstance(self.model, PeftModel) and isinstance(init, str) and (
            init.startswith("pissa") or init == "olora"
        ):
            self._initial_adapter_dir = tempfile.TemporaryDirectory(prefix="initial-adapter-")
            config = self.model.peft_config["default"]
            config.init_lora_weights = True
            self.model.save_pretrained(self._initial_adapter_dir.name)
            config.init_lora_weights = init

    def check_strategy(self, strategy: object) -> None:
        """Refuse a strategy this module cannot train with, naming what to use instead.

        - GaLore / GaRare under a sharding strategy
          (:func:`app.optim.compat.check_optimizer_strategy`);
        - LoRA+ (``loraplus_lr_ratio``) under FSDP;
        - Lightning's plain ``ModelParallelStrategy``: it expects ``configure_model`` to
          shard the model, which this module leaves to
          :class:`app.fsdp2.AdapterFSDP2Strategy` (``configs/strategy/fsdp2.yaml``: it shards
          at setup and keeps checkpoints adapter-only); the plain one would train an
          unsynchronised full copy on every rank.

        Raises:
            ConfigError: For the combinations above.
        """
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        check_optimizer_strategy(self.optimizer_factory, strategy)
        from app.fsdp2 import AdapterFSDP2Strategy

        if self.loraplus_lr_ratio is not None and isinstance(strategy, FSDPStrategy):
            raise ConfigError(
                "model.init_args.loraplus_lr_ratio (LoRA+) does not support trainer.strategy="
                f"{type(strategy).__name__}: PEFT's create_loraplus_optimizer tells A from B "
                "partly by parameter dimensions, which FSDP flattens; use FSDP2 "
                "(configs/strategy/fsdp2.yaml) or trainer.strategy=ddp (configs/strategy/ddp.yaml)")
        if isinstance(strategy, ModelParallelStrategy) and not isinstance(
                strategy, AdapterFSDP2Strategy):
            raise ConfigError(
                f"{type(self).__name__} does not support trainer.strategy="
                f"{type(strategy).__name__} (FSDP2 / tensor parallelism) directly: the model is "
                "not sharded in configure_model and checkpoints hold only the adapter; use "
                "FSDP2 through configs/strategy/fsdp2.yaml (app.fsdp2.AdapterFSDP2Strategy), or "
                "trainer.strategy=ddp (configs/strategy/ddp.yaml)")

    @property
    def trainable_state_keys(self) -> set[str]:
        """``state_dict`` keys a checkpoint holds (see :func:`app.adapters.adapter_state_keys`)."""
        assert self.model is not None
        if self._state_keys is not None:
            return set(self._state_keys)
        return {f"model.{k}" for k in adapter_state_keys(self.model)}

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
        if self.loraplus_lr_ratio is not None:
            from peft.optimizers import create_loraplus_optimizer

            factory = self.optimizer_factory
            probe_optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
            probe = probe_optimizer.defaults

            def build(groups: Any, **kwargs: Any) -> torch.optim.Optimizer:
                return factory(groups, **kwargs)

            build.__name__ = type(probe_optimizer).__name__  # PEFT reads the class name
            optimizer = create_loraplus_optimizer(
                self.model, build, lr=probe["lr"],
                loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=probe.get("weight_decay", 0.0),
            )
        else:
            optimizer = self.optimizer_factory(self.parameter_groups())
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups: weight decay on matrices, none on vectors and on
        ``no_decay_patterns`` (torch optimizers record the names as ``param_names``)."""
        assert self.model is not None
        patterns = self.no_decay_patterns + tuple(getattr(self.adapter, "no_decay_patterns", ()))
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                name = _unwrapped_name(name)
                ndim = self._param_ndims.get(name, param.ndim)
                (no_decay if _no_decay(name, ndim, patterns) else decay).append((name, param))
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Dropout draws from the global generators: restoring them makes a resumed run
        # continue exactly as an uninterrupted one (the data order is seeded separately).
        checkpoint["rng_states"] = _rng_states()
        # Ranks draw different amounts (dropout over differently padded batches), so each
        # rank's state is kept; every rank writes checkpoints together, so this gather is safe.
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, _rng_states())
            checkpoint["rng_states"]["per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is None:
            self.configure_model()
        # FSDP loads the weights itself and passes the rest without `state_dict`; its keys
        # are checked by app.strategies.AdapterFSDPStrategy.load_checkpoint.
        if "state_dict" in checkpoint:
            self.check_checkpoint_keys(set(checkpoint["state_dict"]))
        if "rng_states" in checkpoint and self._trainer is not None and (
                self.trainer.state.fn == "fit"):
            states = checkpoint["rng_states"]
            per_rank = states.get("per_rank") or []
            rank = self.trainer.global_rank
            if rank < len(per_rank) and len(per_rank) == self.trainer.world_size:
                states = per_rank[rank]
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    # -- export ---------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike, tokenizer_source: str | None = None
                     ) -> Path:
        """Write the trained part for reuse outside this project.

        PEFT adapters go out in PEFT's own format (``PeftModel.from_pretrained`` loads them;
        PiSSA / OLoRA converted to plain LoRA), full fine-tuning as a complete Hugging Face
        model. The model config (labels, problem type) and the tokenizer are written beside
        it. The folder appears atomically: it is written under a temporary name and renamed.

        Returns:
            The folder written.
        """
        assert self.model is not None
        target = Path(directory)
        with atomic_folder(target) as tmp:
            self._write_export(tmp)
            self._save_tokenizer(tmp, tokenizer_source)
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

    def _write_export(self, folder: Path) -> None:
        model = self.model
        exporter: Callable[[Path], None] | None = getattr(self.adapter, "export", None)
        if isinstance(model, PeftModel):
            model.peft_config["default"].base_model_name_or_path = resolve_checkpoint(
                self.checkpoint)
            kwargs = {}
            if self._initial_adapter_dir is not None:
                kwargs["path_initial_model_for_weight_conversion"] = self._initial_adapter_dir.name
            model.save_pretrained(str(folder), **kwargs)
            if kwargs:
                _restore_modules_to_save(model, folder)
            task_model = model.base_model.model
            # The base checkpoint's config names its own class (often the bare encoder).
            task_model.config.architectures = [type(task_model).__name__]
            task_model.config.save_pretrained(str(folder))
        elif callable(exporter):
            exporter(model, folder, resolve_checkpoint(self.checkpoint))
        else:
            model.save_pretrained(str(folder))

    def _save_tokenizer(self, folder: Path, source: str | None) -> None:
        from transformers import AutoTokenizer

        try:
            tokenizer = load_pretrained(AutoTokenizer, source or self.checkpoint)
        except (ConfigError, ValueError, OSError) as err:  # image models have none
            log.info("no tokenizer saved with the adapter: %s", err)
            return
        tokenizer.save_pretrained(str(folder))


def _restore_modules_to_save(model: PeftModel, folder: Path) -> None:
    """PEFT 0.21's PiSSA / OLoRA conversion drops the ``modules_to_save`` weights (the task
    head) from the saved file; put them back so the adapter loads and gives the same outputs."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    saved = load_file(str(path))
    full = get_peft_model_state_dict(model)
    missing = {k: v.contiguous() for k, v in full.items() if k not in saved and "lora_" not in k}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})
