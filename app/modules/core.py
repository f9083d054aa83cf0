"""What every task module does with its model, as plain functions.

The task modules (:mod:`app.modules.classification`, ...) hold a Hugging Face model and a
method (:func:`app.adapters.resolve_method`); :class:`app.modules.adapted.AdaptedModule` wires
these functions into Lightning's hooks, so a task module adds only its steps and metrics:

- :func:`prepare_method`: the start-up checks on a meta-device copy of the model;
- :func:`build_model`: load the pretrained model and apply the method;
- :func:`parameter_groups`: named groups, weight decay off for vectors and the method's
  ``no_decay`` factors;
- :func:`trainable_state_keys`: what an adapter-only checkpoint holds;
- :func:`rng_states` / :func:`restore_rng_states`: the global random states of every rank;
- :func:`save_preprocessor`: the tokenizer (or image processor) beside an export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from app import precision as precision_policy
from app.adapters import (
    adapter_state_keys,
    check_adapter,
    head_module_names,
    resolve_method,
)
from app.adapters.contract import Method, MethodSpec
from app.adapters.targets import matches_component, with_default_targets
from app.errors import ConfigError
from app.hub import load_pretrained
from app.optim.compat import check_optimizer_adapter

__all__ = [
    "build_model",
    "count_parameters",
    "enable_gradient_checkpointing",
    "parameter_groups",
    "prepare_method",
    "restore_rng_states",
    "rng_states",
    "save_preprocessor",
    "trainable_state_keys",
]

log = logging.getLogger(__name__)

#: Name parts that FSDP1 / activation checkpointing insert into wrapped parameters' names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def prepare_method(model_class: Any, hf_config: Any, adapter: object | None,
                   optimizer: Any) -> tuple[object | None, Method]:
    """Resolve and check the method on a meta-device model (nothing is allocated).

    Args:
        model_class: The task's ``AutoModelFor*`` class.
        hf_config: The model config.
        adapter: ``model.init_args.adapter``.
        optimizer: ``model.init_args.optimizer``.

    Returns:
        ``(adapter, method)``: the adapter with a null ``target_modules`` filled for models
        PEFT has no default for (a copy; the given one is unchanged) and its method.

    Raises:
        ConfigError: Targets that match nothing, an optimizer that cannot train this
            adapter / model, an adapter of unknown kind.
    """
    with torch.device("meta"):
        meta_model = model_class.from_config(hf_config)
        adapter = with_default_targets(meta_model, adapter)
        method = resolve_method(adapter, optimizer)
        check_adapter(meta_model, method)
        check_optimizer_adapter(optimizer, adapter, meta_model)
    return adapter, method


def build_model(model_class: Any, checkpoint: str, hf_config: Any, method: Method,
                head_modules: Any = None, *, precision: str | None = None,
                dtype: str = "auto", attn_implementation: str | None = None,
                gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """Load the pretrained model and apply the method; the task heads stay trainable.

    ``head_modules(model)`` names the heads (default :func:`app.adapters.head_module_names`;
    causal LMs have none: their ``lm_head`` is pretrained). The frozen base is loaded in the
    dtype :func:`app.precision.frozen_load_dtype` gives for ``dtype`` and the trainer's
    ``precision``; the trainable tensors are then made fp32 masters
    (:func:`app.precision.cast_trainable`). ``attn_implementation`` is passed to
    ``from_pretrained`` (``None``: transformers' default); ``gradient_checkpointing`` turns
    on the model's own non-reentrant activation checkpointing.

    Returns:
        ``(model, head module names)``, the model in training mode.

    Raises:
        ConfigError: An attention implementation the model or machine cannot load, or
            checkpointing on a model that does not support it.
    """
    kwargs: dict[str, Any] = {"config": hf_config,
                              "dtype": precision_policy.frozen_load_dtype(dtype, precision)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        base = load_pretrained(model_class, checkpoint, **kwargs)
    except (ValueError, ImportError) as err:
        if attn_implementation is None:
            raise
        raise ConfigError(
            f"model.init_args.attn_implementation={attn_implementation!r} cannot be used here "
            f"({str(err).splitlines()[0][:200]}); choose sdpa or eager, or null for "
            "transformers' default") from err
    if gradient_checkpointing:
        enable_gradient_checkpointing(base)
    heads = (head_modules or head_module_names)(base)
    model = method.apply(base, heads)
    precision_policy.cast_trainable(model, precision)
    model.train()  # from_pretrained returns eval mode; dropout must be on for fit
    return model, heads


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on the Hugging Face model's activation checkpointing, non-reentrant (it needs no
    input that requires grad, so it works with frozen embeddings and every adapter, and it
    recomputes dropout with the same random state, so gradients equal the plain ones).

    Raises:
        ConfigError: The model class does not support gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"model.init_args.gradient_checkpointing=true but {type(model).__name__} does not "
            "support activation checkpointing; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache is useless in training and clashes with it


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def unwrapped_name(name: str) -> str:
    """``name`` without the wrapper parts FSDP adds (the name before the model was wrapped)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def parameter_groups(model: torch.nn.Module, no_decay: tuple[str, ...],
                     ndims: dict[str, int], heads: Sequence[str] = (),
                     head_lr: float | None = None) -> list[dict[str, Any]]:
    """Named parameter groups: weight decay on matrices, none on vectors and on parameters
    whose name contains a ``no_decay`` part (torch optimizers record the names as
    ``param_names``); with ``head_lr``, the parameters of the ``heads`` modules get groups
    of their own at that learning rate (``"lr"`` in the group overrides the optimizer's).

    Args:
        model: The (possibly FSDP-wrapped) model.
        no_decay: The method's ``spec.no_decay``.
        ndims: Each parameter's real rank by unwrapped name (FSDP1 shows flat 1-D shards).
        heads: Task-head module names (:func:`app.adapters.head_module_names`); a parameter
            belongs to a head when the head's dotted name is a run of its name's components
            (so PEFT's ``...classifier.modules_to_save.default.weight`` does).
        head_lr: The heads' learning rate; ``None`` keeps them at the optimizer's.
    """
    split = head_lr is not None and bool(heads)
    groups: dict[tuple[bool, bool], list[tuple[str, torch.nn.Parameter]]] = {
        (False, False): [], (True, False): [], (False, True): [], (True, True): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = unwrapped_name(name)
            ndim = ndims.get(name, param.ndim)
            skip = ndim < 2 or any(p in name for p in no_decay)
            head = split and matches_component(name, heads)
            groups[(skip, head)].append((name, param))
    out = []
    for (skip, head), params in groups.items():
        if params:
            group: dict[str, Any] = {"params": params}
            if skip:
                group["weight_decay"] = 0.0
            if head:
                group["lr"] = head_lr
            out.append(group)
    return out


def trainable_state_keys(model: torch.nn.Module, spec: MethodSpec) -> frozenset[str]:
    """The module ``state_dict`` keys (``model.`` + ...) an adapter-only checkpoint holds."""
    return frozenset(f"model.{k}" for k in adapter_state_keys(model, spec))


def _local_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def rng_states() -> dict[str, Any]:
    """This process's global random states (CPU, and CUDA once initialised), plus every
    rank's under ``per_rank`` in a multi-process run (a collective: call on every rank).

    Dropout draws from the global generators: restoring them makes a resumed run continue
    exactly as an uninterrupted one (the data order is seeded separately). Ranks draw
    different amounts (dropout over differently padded batches), so each rank's is kept.
    """
    states = _local_rng_states()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, _local_rng_states())
        states["per_rank"] = per_rank
    return states


def restore_rng_states(states: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore what :func:`rng_states` saved: this rank's own states when the run has the
    same number of processes, else the saving process's."""
    per_rank = states.get("per_rank") or []
    if rank < len(per_rank) and len(per_rank) == world_size:
        states = per_rank[rank]
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_preprocessor(folder: Any, source: str, factory: Any) -> None:
    """Save ``factory.from_pretrained(source)`` (a tokenizer or image processor) into
    ``folder``; a model without one (an image model has no tokenizer) is logged and skipped."""
    try:
        processor = load_pretrained(factory, source)
    except (ConfigError, ValueError, OSError) as err:
        log.info("no %s saved with the adapter: %s", getattr(factory, "__name__", factory), err)
        return
    processor.save_pretrained(str(folder))
