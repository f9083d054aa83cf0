"""Target matching, in one place, and the default ``target_modules`` for a null setting.

Two meanings of "a name matches a target", each defined once here:

- :func:`matches_target`: PEFT's list matching (the module name equals the entry or ends with
  ``.entry``; a string is a full-match regex), used by every adapter;
- :func:`matches_component`: GaLore's matching of dotted name components anywhere in a
  parameter name (``"attention.output.dense"`` matches ``...attention.output.dense.weight``).

Defaults: PEFT's table, else the query / value layers.

PEFT fills a null ``LoraConfig.target_modules`` from
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` by ``model_type``. Models missing from
that table (ViT under transformers 5.x, which names its attention ``q_proj`` / ``v_proj``)
would fail inside PEFT with a message about the table. :func:`with_default_targets` gives
such an adapter the model's query and value projections instead, for every adapter family
(PEFT's configs and ours) and every task module, before anything is built; the user's config
object is never changed (a copy gets the targets).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence

import torch

from app.errors import ConfigError

log = logging.getLogger(__name__)

#: Leaf names of the query and value projections, tried in order.
QUERY_VALUE_NAMES: tuple[tuple[str, str], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("query_proj", "value_proj"),
)


def matches_target(name: str, target: str) -> bool:
    """PEFT's list matching: ``name`` equals ``target`` or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def matches_component(name: str, targets: Sequence[str]) -> bool:
    """GaLore's matching: some ``targets`` entry is a run of whole dotted components of ``name``."""
    padded = f".{name}."
    return any(f".{t.strip('.')}." in padded for t in targets)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of all ``nn.Linear`` modules (works on a meta-device model)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_target_modules(
    model: torch.nn.Module, targets: Iterable[str] | str | None, option: str
) -> None:
    """Raise a clear error if ``targets`` match no module of ``model``.

    Follows PEFT's matching: a string is a full-match regex over module names; a list entry
    matches a module whose name equals it or ends with ``.entry`` (:func:`matches_target`).

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
        unmatched = [t for t in targets if not any(matches_target(n, t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        raise ConfigError(
            f"{option}: {sorted(unmatched)} match no module of {type(model).__name__}; "
            f"linear layers in this model are named {leaves[:12]}"
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


def with_default_targets(model: torch.nn.Module, adapter: object | None) -> object | None:
    """``adapter``, or a copy of it whose null ``target_modules`` is filled where PEFT has no
    default for the model type. ``adapter`` itself is never changed.

    Returns the adapter itself when it is ``None`` (full fine-tuning), has no
    ``target_modules`` field, lists its targets, or the model type is in PEFT's table.

    Raises:
        ConfigError: The model type is unknown to PEFT and has none of the
            :data:`QUERY_VALUE_NAMES` pairs: the user must list the targets.
    """
    if adapter is None or getattr(adapter, "target_modules", ()) is not None:
        return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if peft_default_targets(model_type) is not None:
        return adapter
    targets = default_query_value_targets(model)
    if targets is None:
        raise ConfigError(
            "model.init_args.adapter.init_args.target_modules is null and PEFT has no default "
            f"for model type {model_type!r}; {type(model).__name__} has no query / value "
            f"layers named {[list(p) for p in QUERY_VALUE_NAMES]}: list target_modules "
            "explicitly")
    filled = copy.deepcopy(adapter)
    filled.target_modules = targets
    log.info("adapter target_modules null: using %s", targets)
    return filled
