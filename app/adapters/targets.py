"""Default ``target_modules`` for a null setting: PEFT's table, else the query / value layers.

PEFT fills a null ``LoraConfig.target_modules`` from
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` by ``model_type``. Models missing from
that table (ViT under transformers 5.x, which names its attention ``q_proj`` / ``v_proj``)
would fail inside PEFT with a message about the table. :func:`fill_default_targets` gives
such an adapter the model's query and value projections instead, for every adapter family
(PEFT's configs and ours) and every task module, before anything is built.
"""

from __future__ import annotations

import logging

import torch

from app.adapters import linear_module_names
from app.errors import ConfigError

log = logging.getLogger(__name__)

#: Leaf names of the query and value projections, tried in order.
QUERY_VALUE_NAMES: tuple[tuple[str, str], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("query_proj", "value_proj"),
)


def peft_default_targets(model_type: str | None) -> list[str] | None:
    """PEFT's default LoRA targets for a transformers ``model_type`` (``None`` if unknown)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    return list(found) if found is not None else None


def default_query_value_targets(model: torch.nn.Module) -> list[str] | None:
    """The query and value projection names of ``model`` (``None`` if none of the usual ones).

    Args:
        model: The base model (a meta-device copy is enough).
    """
    leaves = {name.rsplit(".", 1)[-1] for name in linear_module_names(model)}
    for pair in QUERY_VALUE_NAMES:
        if set(pair) <= leaves:
            return list(pair)
    return None


def fill_default_targets(model: torch.nn.Module, adapter: object | None) -> None:
    """Set a null ``adapter.target_modules`` where PEFT has no default for the model type.

    Leaves the adapter alone when it is ``None`` (full fine-tuning), has no
    ``target_modules`` field, lists its targets, or the model type is in PEFT's table.

    Raises:
        ConfigError: The model type is unknown to PEFT and has none of the
            :data:`QUERY_VALUE_NAMES` pairs: the user must list the targets.
    """
    if adapter is None or getattr(adapter, "target_modules", ()) is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if peft_default_targets(model_type) is not None:
        return
    targets = default_query_value_targets(model)
    if targets is None:
        raise ConfigError(
            "model.init_args.adapter.init_args.target_modules is null and PEFT has no default "
            f"for model type {model_type!r}; {type(model).__name__} has no query / value "
            f"layers named {[list(p) for p in QUERY_VALUE_NAMES]}: list target_modules "
            "explicitly")
    adapter.target_modules = targets
    log.info("adapter target_modules null: using %s", targets)
