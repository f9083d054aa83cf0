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

Checkpoints stay adapter-only and are gathered tensor by tensor: only what a checkpoint keeps
(:attr:`app.modules.adapted.AdaptedModule.trainable_state_keys`) is gathered, in one
collective (:func:`gather_kept`), never the frozen base; ``state_dict_type`` stays ``"full"``
for loading: FSDP's sharded format loads every key of the model and would miss the frozen
base. ``use_orig_params`` is fixed to
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

__all__ = ["AdapterFSDPStrategy", "adapter_wrap_policy", "gather_kept",
           "transformer_layer_classes"]


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


def gather_kept(model: torch.nn.Module, keep: set[str], shapes: dict[str, torch.Size]
                ) -> dict[str, torch.Tensor]:
    """The tensors named in ``keep``, whole, on every rank, from an FSDP1 model
    (``use_orig_params=True``), gathering nothing else (a collective: every rank calls it).

    Under ``use_orig_params`` each rank's view of a parameter is its contiguous piece of the
    flattened parameter (possibly empty), in rank order; so the pieces of every kept parameter
    are concatenated into one buffer per rank, exchanged in one ``all_gather`` (plus one of
    the piece sizes) and cut back into whole tensors. Buffers are not sharded and are taken
    as they are. The bytes moved are those of the kept tensors, not of the frozen base.

    Args:
        model: The wrapped module (names may hold ``_fsdp_wrapped_module.`` parts).
        keep: Unwrapped state-dict names to return.
        shapes: Each kept parameter's whole shape by unwrapped name (from before wrapping).
    """
    import torch.distributed as dist

    from app.modules.core import unwrapped_name

    params = [(unwrapped_name(n), p) for n, p in model.named_parameters()]
    params = [(n, p) for n, p in params if n in keep]
    out = {n: b.detach().cpu().clone() for n, b in
           ((unwrapped_name(n), b) for n, b in model.named_buffers()) if n in keep}
    if not params:
        return out
    pieces = [p.detach().reshape(-1) for _, p in params]
    device = pieces[0].device
    dtypes = {t.dtype for t in pieces}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    sizes = torch.tensor([t.numel() for t in pieces], device=device)
    world = dist.get_world_size()
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    totals = [int(s.sum()) for s in all_sizes]
    buffer = torch.zeros(max(totals), dtype=dtype, device=device)
    flat = torch.cat([t.to(dtype) for t in pieces])
    buffer[:flat.numel()] = flat
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer)
    per_rank = [list(torch.split(g[:total], s.tolist()))
                for g, total, s in zip(gathered, totals, all_sizes)]
    for index, (name, param) in enumerate(params):
        whole = torch.cat([rank[index] for rank in per_rank])
        out[name] = whole.reshape(shapes[name]).to(param.dtype).cpu()
    return out


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
        if isinstance(model, torch.nn.Module):  # whole shapes, before FSDP flattens them
            self._shapes = {f"model.{n}": p.shape for n, p in model.named_parameters()}
        if "auto_wrap_policy" not in self.kwargs and isinstance(model, torch.nn.Module):
            policy = adapter_wrap_policy(model)
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy
        super().setup(trainer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Only the tensors a checkpoint keeps, gathered alone (:func:`gather_kept`) on every
        rank: saving a LoRA checkpoint of an 8B model moves megabytes, not the base."""
        keep = getattr(self.lightning_module, "trainable_state_keys", None)
        if keep is None or self.model is None:
            return super().lightning_module_state_dict()
        return gather_kept(self.model, set(keep), getattr(self, "_shapes", {}))

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

