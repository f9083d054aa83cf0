"""FSDP for adapters: frozen and trainable weights in separate FSDP units.

``configs/strategy/fsdp.yaml`` selects :class:`AdapterFSDPStrategy`. A fixed
``auto_wrap_policy`` cannot be written in YAML because the right one depends on the model;
this strategy builds it at ``setup`` from the module's model, after ``configure_model``:

- a model with frozen parameters (every adapter method): PEFT's
  ``peft.utils.other.fsdp_auto_wrap_policy`` -- each transformer layer
  (``model._no_split_modules``) is one unit and every leaf module with a trainable ``weight``
  (``lora_A``, ``lora_B``, DoRA's magnitude, the ``modules_to_save`` head) its own unit. With
  frozen and trainable weights in one unit FSDP1 either fails (``use_orig_params=False``:
  "uniform requires_grad") or keeps gradient memory for the whole unit (``True``);
- full fine-tuning: one unit per transformer layer.

Checkpoints stay adapter-only (:class:`app.modules.adapted.AdaptedModule` filters the gathered
full state dict), so ``state_dict_type`` is fixed to ``"full"``: FSDP's sharded format loads
every key of the model and would miss the frozen base. ``use_orig_params`` is fixed to
``True``: the task modules build named parameter groups from ``self.model``.

Like Lightning's ``"fsdp"`` string it needs GPUs; it refuses other devices when it would wrap
the model (after every start-up check of the callbacks and the module has run).
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy

from app.errors import ConfigError

__all__ = ["AdapterFSDPStrategy", "adapter_wrap_policy", "transformer_layer_classes"]


def transformer_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """Classes named in ``_no_split_modules`` of ``model`` or any submodule (``BertLayer``...)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def adapter_wrap_policy(model: torch.nn.Module) -> Any | None:
    """The FSDP1 ``auto_wrap_policy`` for ``model`` (see the module docstring).

    Args:
        model: The model as built by ``configure_model`` (a ``PeftModel``, a model with the
            project's own adapter layers, or a plain transformers model for full fine-tuning).

    Returns:
        A policy callable, or ``None`` (wrap the whole model as one unit) when the model has
        neither frozen parameters nor known transformer layers.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    frozen = any(not p.requires_grad for p in model.parameters())
    if frozen:
        from peft.utils.other import fsdp_auto_wrap_policy

        return fsdp_auto_wrap_policy(model)
    layers = transformer_layer_classes(model)
    if not layers:
        return None
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1) with the adapter-aware auto-wrap policy built at ``setup``.

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state
            sharded), ``SHARD_GRAD_OP``, ``NO_SHARD``, ``HYBRID_SHARD`` (full sharding within a
            node, replication across nodes: less inter-node traffic).
        cpu_offload: Keep the sharded parameters on the CPU between uses.
        process_group_backend: ``nccl`` on GPUs by default.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD",
                                   "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            process_group_backend=process_group_backend,
            timeout=timeout,
            state_dict_type="full",
            use_orig_params=True,
        )

    def setup(self, trainer: L.Trainer) -> None:
        """Build the wrap policy from the configured model (unless one was given), then wrap."""
        module = self.lightning_module
        model = getattr(module, "model", None)
        if "auto_wrap_policy" not in self.kwargs and isinstance(model, torch.nn.Module):
            policy = adapter_wrap_policy(model)
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy
        super().setup(trainer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Refuse non-GPU devices with a message naming the alternative, else wrap."""
        if self.root_device.type != "cuda":
            raise ConfigError(
                f"{type(self).__name__} (configs/strategy/fsdp.yaml) needs GPUs "
                f"(trainer.accelerator=gpu), got device {self.root_device}; on CPU use "
                "configs/strategy/ddp.yaml")
        return super()._setup_model(model)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Check the checkpoint's keys against the module, then let FSDP load it.

        FSDP loads the weights itself and hands ``on_load_checkpoint`` a checkpoint without
        ``state_dict``, so the module's own key check is done here (non-strict loading would
        otherwise accept a checkpoint of another method silently).
        """
        from lightning.fabric.utilities.load import _lazy_load

        path = Path(self.broadcast(checkpoint_path))
        check = getattr(self.lightning_module, "check_checkpoint_keys", None)
        if path.is_file() and callable(check):
            check(set(_lazy_load(path)["state_dict"]))
        return super().load_checkpoint(path, weights_only=weights_only)

