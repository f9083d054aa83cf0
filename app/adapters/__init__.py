"""How a base model gets its trainable part.

:func:`apply_adapter` is the single entry point the task modules call. ``adapter`` is
``None`` (full fine-tuning), any ``peft.PeftConfig`` (LoRA and its PEFT variants: rsLoRA,
DoRA, PiSSA / OLoRA init; also our LoRA-family configs that subclass ``LoraConfig``), or one of
this package's own configs (:class:`AdapterConfig` subclasses, e.g. StelLA).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import PeftConfig, PeftModel, get_peft_model

from app.errors import ConfigError


@dataclass
class AdapterConfig:
    """Base class of the project's own (non-PEFT) adapter configs.

    Subclasses implement :meth:`apply`; ``no_decay_patterns`` name parameters that must be
    kept out of weight decay (e.g. Stiefel factors).
    """

    def apply(self, model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
        """Freeze the base, add the adapter, keep ``head_modules`` trainable; return the model."""
        raise NotImplementedError

    def target_patterns(self) -> list[str] | str | None:
        """The target module names or regex, for validation before the model is loaded."""
        return None


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


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of all ``nn.Linear`` modules (works on a meta-device model)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_target_modules(
    model: torch.nn.Module, targets: Iterable[str] | str | None, option: str
) -> None:
    """Raise a clear error if ``targets`` match no module of ``model``.

    Follows PEFT's matching: a string is a full-match regex over module names; a list entry
    matches a module whose name equals it or ends with ``.entry``.

    Args:
        model: The base model (a meta-device copy is enough).
        targets: ``target_modules`` as given by the user (``None``: nothing to check).
        option: The config key to name in the message.
    """
    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        raise ConfigError(
            f"{option}: {sorted(unmatched)} match no module of {type(model).__name__}; "
            f"linear layers in this model are named {leaves[:12]}"
        )


def check_adapter(model: torch.nn.Module, adapter: object | None) -> None:
    """Validate an adapter config against a (meta-device) base model before training."""
    if adapter is None:
        return
    if isinstance(adapter, PeftConfig):
        check_target_modules(model, getattr(adapter, "target_modules", None),
                             "model.init_args.adapter.init_args.target_modules")
    elif isinstance(adapter, AdapterConfig):
        check_target_modules(model, adapter.target_patterns(),
                             "model.init_args.adapter.init_args.target_modules")
    else:
        raise ConfigError(
            f"model.init_args.adapter: {type(adapter).__name__} is neither a peft.PeftConfig "
            "nor an app.adapters.AdapterConfig"
        )


def apply_adapter(
    model: torch.nn.Module, adapter: object | None, head_modules: list[str]
) -> torch.nn.Module:
    """Return ``model`` ready for training with ``adapter``.

    Args:
        model: A loaded Hugging Face model.
        adapter: ``None`` for full fine-tuning, a ``PeftConfig``, or an :class:`AdapterConfig`.
        head_modules: Task-head module names that are always trained (PEFT stores them as
            ``modules_to_save``).

    Returns:
        The model itself (full fine-tuning), a ``PeftModel``, or the model with our layers.
    """
    check_adapter(model, adapter)
    if adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if isinstance(adapter, PeftConfig):
        saved = list(getattr(adapter, "modules_to_save", None) or [])
        adapter.modules_to_save = sorted(set(saved) | set(head_modules))
        peft_model = get_peft_model(model, adapter)
        initialize = getattr(adapter, "initialize", None)
        if callable(initialize):  # our LoRA-family configs re-initialise / freeze factors
            initialize(peft_model)
        return peft_model
    return adapter.apply(model, head_modules)


def adapter_state_keys(model: torch.nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` that a checkpoint must hold.

    Everything trainable, plus adapter tensors that are frozen but not part of the pretrained
    base (e.g. Asymmetric LoRA's fixed ``A``). The frozen pretrained weights are excluded:
    they are reloaded from the checkpoint source.
    """
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):
        prefix = model.base_model.prefix
        keys |= {k for k in model.state_dict() if prefix in k or "modules_to_save" in k}
    markers = getattr(model, "adapter_state_markers", ())
    keys |= {k for k in model.state_dict() if any(m in k for m in markers)}
    return keys
