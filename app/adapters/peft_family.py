"""The PEFT LoRA family as a :class:`~app.adapters.contract.Method`: PEFT builds, merges and
saves; our LoRA-family configs (``peft.LoraConfig`` subclasses) only declare.

A config used as ``model.init_args.adapter`` that is a ``peft.PeftConfig`` is wrapped in
:class:`PeftMethod`. It reads from the config, where present:

- ``spec`` (class attribute, a :class:`~app.adapters.contract.MethodSpec`; default
  :data:`LORA_SPEC`),
- ``constraint()`` (the manifold-constrained factors),
- ``initialize(peft_model)`` (re-initialise / freeze factors after ``get_peft_model``),
- ``build_optimizer(model, factory, groups)`` (a method-specific optimizer, e.g. LoRA+).

The user's config is never changed: the task head is added to ``modules_to_save`` of a copy.
PiSSA / OLoRA change the base weights; PEFT converts them to plain LoRA at save time from the
initial adapter, which :class:`PeftMethod` keeps in a temporary folder for the export.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from app.adapters.contract import Constraint, Method, MethodSpec

__all__ = ["LORA_SPEC", "LoraFamilyConfig", "PeftMethod", "peft_spec"]

#: LoRA and the plain PEFT variants (rsLoRA, DoRA, PiSSA / OLoRA init).
LORA_SPEC = MethodSpec(name="LoRA", rank_field="adapter.r")


@dataclasses.dataclass
class LoraFamilyConfig(LoraConfig):
    """Base of our ``peft.LoraConfig`` subclasses: PEFT builds, merges and saves them; the
    fields a subclass adds (``_own_fields``) are left out of the exported
    ``adapter_config.json``, so the adapter is a standard LoRA one that any PEFT loads.

    Subclasses set ``spec`` and may define ``constraint()``, ``initialize(peft_model)`` and
    ``build_optimizer(model, factory, groups)`` (see the module docstring).
    """

    _own_fields: ClassVar[tuple[str, ...]] = ()
    spec: ClassVar[MethodSpec] = LORA_SPEC

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict without this class's own fields: a plain ``LoraConfig``."""
        return {k: v for k, v in super().to_dict().items() if k not in self._own_fields}


def peft_spec(cls: type) -> MethodSpec:
    """The declaration of a PEFT config class: its ``spec``, else :data:`LORA_SPEC` for a
    config with an ``r`` field, else a spec without a rank."""
    spec = getattr(cls, "spec", None)
    if isinstance(spec, MethodSpec):
        return spec
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return LORA_SPEC if "r" in names else MethodSpec(name=cls.__name__, rank_field=None)


class PeftMethod(Method):
    """A ``peft.PeftConfig`` as a method (see the module docstring).

    Args:
        config: The adapter config from the YAML (left unchanged).
    """

    def __init__(self, config: PeftConfig) -> None:
        self.config = config
        self.spec = peft_spec(type(config))  # type: ignore[misc]
        self._initial_adapter_dir: tempfile.TemporaryDirectory | None = None

    def constraint(self) -> Constraint | None:
        declared = getattr(self.config, "constraint", None)
        return declared() if callable(declared) else None

    def target_patterns(self) -> list[str] | str | None:
        return getattr(self.config, "target_modules", None)

    def apply(self, model: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
        config = copy.deepcopy(self.config)
        saved = list(getattr(config, "modules_to_save", None) or [])
        config.modules_to_save = sorted(set(saved) | set(head_modules))
        peft_model = get_peft_model(model, config)
        initialize = getattr(config, "initialize", None)
        if callable(initialize):  # our LoRA-family configs re-initialise / freeze factors
            initialize(peft_model)
        self._keep_initial_adapter(peft_model)
        return peft_model

    def _keep_initial_adapter(self, model: PeftModel) -> None:
        init = getattr(self.config, "init_lora_weights", True)
        self._initial_adapter_dir = None
        if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
            self._initial_adapter_dir = tempfile.TemporaryDirectory(prefix="initial-adapter-")
            config = model.peft_config["default"]
            config.init_lora_weights = True
            model.save_pretrained(self._initial_adapter_dir.name)
            config.init_lora_weights = init

    def export(self, model: torch.nn.Module, folder: Path, base_path: str) -> None:
        """PEFT's own format (PiSSA / OLoRA converted to plain LoRA) plus the model config."""
        assert isinstance(model, PeftModel)
        model.peft_config["default"].base_model_name_or_path = base_path
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

    def build_optimizer(self, model: torch.nn.Module, factory: Any,
                        groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        build = getattr(self.config, "build_optimizer", None)
        return build(model, factory, groups) if callable(build) else factory(groups)


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
