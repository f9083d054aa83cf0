"""FSDP2 for adapters: ``fully_shard`` per transformer layer, tall factors sharded along rows.

``configs/strategy/fsdp2.yaml`` selects :class:`AdapterFSDP2Strategy`, Lightning's
``ModelParallelStrategy`` with data-parallel size = world size (no tensor parallelism). At
``setup`` it shards the module's model with :func:`shard_model` (each transformer layer, then
the root), so the task modules keep building plain Hugging Face / PEFT models. Parameters
become ``DTensor`` s sharded on one dimension:

- 2-D trainable parameters along their *long* dimension (``Shard(0)`` for a tall ``out x r``
  factor, ``Shard(1)`` for a wide ``r x in`` one such as LoRA's ``A`` or StelLA's ``V^T``), so
  every rank holds whole rows of the tall form and the ``r x r`` manifold math is a local
  product plus one all-reduce (:mod:`app.manifolds.sharded`);
- everything else along dim 0 (FSDP2's default).

Checkpoints stay adapter-only, in two formats (``save_distributed_checkpoint``): sharded
(a ``torch.distributed.checkpoint`` folder, each rank writes its shards: nothing gathered) or
full (one file, the trained tensors gathered on rank 0). Resuming reads either. The adapter
export gathers the trained tensors and writes the same PEFT folder as a single process.

Runs on CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from app.strategies import transformer_layer_classes

__all__ = ["AdapterFSDP2Strategy", "gather_trained", "is_sharded", "local",
           "mixed_precision_policy", "shard_model", "shard_placement"]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view of the parameter's storage), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def shard_placement(param: torch.nn.Parameter) -> Any:
    """``Shard(d)`` along the long dimension of a 2-D trainable parameter, else ``Shard(0)``."""
    from torch.distributed.tensor import Shard

    if param.requires_grad and param.ndim == 2 and param.shape[1] > param.shape[0]:
        return Shard(1)
    return Shard(0)


def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a Lightning precision string.

    Under ``bf16-mixed`` (``16-mixed``) the parameters are all-gathered in bf16 (fp16) for
    compute, half the bytes of fp32, while the sharded masters stay fp32 and gradients are
    reduce-scattered in fp32 (sums of many half-precision gradients lose bits). Any other
    precision: the default policy (parameters gathered in their own dtype).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if half is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, mesh: Any, mp_policy: Any = None) -> torch.nn.Module:
    """``fully_shard`` every transformer layer (``_no_split_modules``), then the root.

    Args:
        model: The task model as built by ``configure_model`` (PEFT or not).
        mesh: The 1-D data-parallel device mesh.
        mp_policy: A ``MixedPrecisionPolicy`` (:func:`mixed_precision_policy`); ``None``: the
            default one.

    Returns:
        ``model`` (sharded in place).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    layers = transformer_layer_classes(model)
    for module in model.modules():
        if type(module) in layers:
            fully_shard(module, mesh=mesh, shard_placement_fn=shard_placement,
                        mp_policy=policy)
    fully_shard(model, mesh=mesh, shard_placement_fn=shard_placement, mp_policy=policy)
    return model


def gather_trained(model: torch.nn.Module, keep: set[str] | None,
                   state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors named in ``keep`` (``None``: all), whole, as CPU tensors on every rank.

    Only those are gathered (``full_tensor``, one all-gather each): a checkpoint or export of
    an adapter moves the adapter's bytes, not the frozen base. A collective: every rank calls
    it with the same ``keep``.

    Args:
        model: The ``fully_shard``-ed model.
        keep: State-dict names to gather.
        state: A sharded state dict already taken (default: the model's, unfiltered).
    """
    if state is None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    state = {k: v for k, v in state.items() if keep is None or k in keep}
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu()
            for k, v in state.items()}


class AdapterFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism for every method (``configs/strategy/fsdp2.yaml``).

    Args:
        save_distributed_checkpoint: ``True``: sharded checkpoints (a folder; every rank
            writes its shards). ``False``: one full file (the trained tensors gathered on
            rank 0). Either format resumes exactly under this strategy.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU by default.
        timeout: Collective timeout.
    """

    def __init__(self, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        self._data_parallel_size = self.world_size  # pure data parallelism over all ranks

    def setup(self, trainer: Any) -> None:
        """Shard the module's model (once), then let Lightning set up optimizers etc."""
        model = getattr(self.lightning_module, "model", None)
        if isinstance(model, torch.nn.Module) and not _is_fully_sharded(model):
            shard_model(model, self.device_mesh["data_parallel"],
                        mixed_precision_policy(trainer.precision))
        super().setup(trainer)

    # -- checkpoints ------------------------------------------------------------------------
    def _trainable_keys(self) -> set[str] | None:
        keys = getattr(self.lightning_module, "trainable_state_keys", None)
        return set(keys) if keys is not None else None

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trained tensors only: local shards (sharded format) or gathered (full)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))
        keep = self._trainable_keys()
        if keep is not None:
            state = {k: v for k, v in state.items() if k in keep}
        if self._save_distributed_checkpoint:
            return state
        return self.full_state_dict(state)

    def full_state_dict(self, state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Gather ``state`` (default: the trained tensors) to whole CPU tensors on every rank
        (:func:`gather_trained`). A collective: every rank must call it."""
        assert self.model is not None
        return gather_trained(self.model, self._trainable_keys(), state)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Resume from a sharded folder or a full file holding only the trained tensors."""
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        check = getattr(module, "check_checkpoint_keys", None)
        if path.is_dir():
            return self._load_sharded(path, check, weights_only)
        if path.is_file() and callable(check):
            from lightning.fabric.utilities.load import _lazy_load

            check(set(_lazy_load(path)["state_dict"]))
        return super().load_checkpoint(path, weights_only=weights_only)

    def _load_sharded(self, path: Path, check: Any, weights_only: bool | None
                      ) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = "state_dict."
        stored_keys = {k[len(prefix):] for k in stored if k.startswith(prefix)}
        if callable(check):
            check(stored_keys)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items()
                       if k in stored_keys}
        loaded = {"state_dict": model_state}
        dcp.load(loaded, checkpoint_id=str(path))
        set_model_state_dict(self.model, loaded["state_dict"],
                             options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def _is_fully_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
