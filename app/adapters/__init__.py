"""How a base model gets its trainable part: the method contract and its resolution.

Every method implements :class:`app.adapters.contract.Method` once (see that module for the
contract). :func:`resolve_method` turns the YAML's ``model.init_args.adapter`` and
``model.init_args.optimizer`` into the method object the task modules use:

- ``None`` adapter: :class:`app.adapters.full.FullWeights` (full fine-tuning, or the
  optimizer's own declaration for GaLore / GaRare);
- any ``peft.PeftConfig`` (LoRA and its PEFT variants, our ``LoraConfig`` subclasses):
  :class:`app.adapters.peft_family.PeftMethod`;
- one of this package's :class:`~app.adapters.contract.AdapterConfig` (StelLA): itself.

:func:`declared_spec` gives the same declaration from the classes alone (the comparison tool
reads fragments without building anything).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftConfig, PeftModel

from app.adapters.contract import AdapterConfig, Method, MethodSpec
from app.adapters.full import FULL_SPEC, FullWeights
from app.adapters.peft_family import PeftMethod, peft_spec
from app.adapters.targets import check_target_modules, linear_module_names
from app.errors import ConfigError

__all__ = [
    "AdapterConfig",
    "Method",
    "adapter_state_keys",
    "check_adapter",
    "declared_spec",
    "head_module_names",
    "linear_module_names",
    "resolve_method",
]

_ADAPTER = "model.init_args.adapter"


def declared_spec(adapter_cls: type | None, optimizer_cls: type | None = None) -> MethodSpec:
    """The :class:`~app.adapters.contract.MethodSpec` of a method given by its classes.

    Args:
        adapter_cls: The adapter config class (``None``: ``adapter: null``).
        optimizer_cls: The optimizer class, if known.
    """
    if adapter_cls is not None:
        if issubclass(adapter_cls, PeftConfig):
            return peft_spec(adapter_cls)
        spec = getattr(adapter_cls, "spec", None)
        if not isinstance(spec, MethodSpec):
            raise ConfigError(f"{_ADAPTER}: {adapter_cls.__name__} is neither a peft.PeftConfig "
                              "nor an app.adapters.AdapterConfig")
        return spec
    spec = getattr(optimizer_cls, "spec", None) if optimizer_cls is not None else None
    return spec if isinstance(spec, MethodSpec) else FULL_SPEC


def resolve_method(adapter: object | None, optimizer: Any = None) -> Method:
    """The :class:`~app.adapters.contract.Method` of a run.

    Args:
        adapter: ``model.init_args.adapter`` (``None``, a ``PeftConfig`` or an
            :class:`AdapterConfig`).
        optimizer: ``model.init_args.optimizer`` (an ``OptimizerCallable``), for methods that
            live in the optimizer.

    Raises:
        ConfigError: An adapter of an unknown kind, or an adapter with a full-weight
            optimizer (GaLore / GaRare).
    """
    from app.optim.compat import check_optimizer_adapter, optimizer_class  # app.optim imports us

    check_optimizer_adapter(optimizer, adapter)
    if adapter is None:
        cls = optimizer_class(optimizer) if optimizer is not None else None
        return FullWeights(declared_spec(None, cls))
    if isinstance(adapter, PeftConfig):
        return PeftMethod(adapter)
    if isinstance(adapter, AdapterConfig):
        return adapter
    raise ConfigError(f"{_ADAPTER}: {type(adapter).__name__} is neither a peft.PeftConfig "
                      "nor an app.adapters.AdapterConfig")


def head_module_names(model: torch.nn.Module) -> list[str]:
    """The task head, trained by every method: the top-level children that are not the
    pretrained backbone, plus the backbone's ``pooler`` when it has one.

    For ``BertForSequenceClassification`` this is ``["bert.pooler", "classifier"]``: the
    classifier reads the pooler's ``tanh(dense(h_CLS))``, so the head of the papers' BERT /
    RoBERTa / DeBERTa models (a trained dense layer before the output layer) is only trained
    when the pooler is. RoBERTa's ``classifier`` already holds its dense layer (its backbone has
    no pooler); DeBERTa-v2 keeps its ``pooler`` at the top level (``["pooler",
    "classifier"]``); ``*ForQuestionAnswering`` models build their backbone without a pooler
    (``["qa_outputs"]``). Children without parameters (dropout) are skipped.
    """
    prefix = getattr(model, "base_model_prefix", "")
    heads = [name for name, child in model.named_children()
             if name != prefix and any(True for _ in child.parameters())]
    backbone = getattr(model, prefix, None) if prefix else None
    pooler = getattr(backbone, "pooler", None) if isinstance(backbone, torch.nn.Module) else None
    if isinstance(pooler, torch.nn.Module) and any(True for _ in pooler.parameters()):
        heads.insert(0, f"{prefix}.pooler")
    return heads


def check_adapter(model: torch.nn.Module, method: Method) -> None:
    """Validate a method's targets against a (meta-device) base model before training."""
    check_target_modules(model, method.target_patterns(), f"{_ADAPTER}.init_args.target_modules")


def adapter_state_keys(model: torch.nn.Module, spec: MethodSpec) -> set[str]:
    """Names in ``model.state_dict()`` that a checkpoint must hold.

    Everything trainable, plus adapter tensors that are frozen but not part of the pretrained
    base (e.g. Asymmetric LoRA's fixed ``A``; our own layers by ``spec.state_markers``). The
    frozen pretrained weights are excluded: they are reloaded from the checkpoint source.
    """
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):
        prefix = model.base_model.prefix
        keys |= {k for k in model.state_dict() if prefix in k or "modules_to_save" in k}
    markers = spec.state_markers
    if markers:
        keys |= {k for k in model.state_dict() if any(m in k for m in markers)}
    return keys
