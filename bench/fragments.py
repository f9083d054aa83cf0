"""The benchmarks' view of ``configs/methods/``: which methods to run and how to build them.

No method is named here. :func:`geometry_fragments` picks, from ``configs/methods/``, every
fragment whose method declares a constraint or a callback it needs (its
:class:`app.adapters.contract.MethodSpec` / :class:`~app.adapters.contract.Constraint`), so a
new geometry-aware method is timed by the benchmarks without editing them. Its baseline is the
method it modifies: ``lora.yaml`` for an adapter, ``full.yaml`` (the optimizer a full-weight
method replaces) otherwise. :func:`fragment_parts` builds a fragment's adapter, optimizer and
the callbacks its method declares (monitors and loggers are left out: they are not the
method), with the rank put where the method declares it; :func:`describe` says in one line
what a fragment trains.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS_DIR = ROOT / "configs" / "methods"


def import_path(path: str) -> Any:
    """The object at a dotted class path."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _fragment(name: str) -> dict[str, Any]:
    return yaml.safe_load((METHODS_DIR / f"{name}.yaml").read_text())


def _classes(init: dict[str, Any]) -> tuple[type | None, type]:
    adapter = init.get("adapter")
    return (import_path(adapter["class_path"]) if adapter else None,
            import_path(init["optimizer"]["class_path"]))


def method_spec(name: str) -> Any:
    """The :class:`~app.adapters.contract.MethodSpec` the fragment ``name`` runs."""
    from app.adapters import declared_spec

    return declared_spec(*_classes(_fragment(name)["model"]["init_args"]))


def declared_callbacks(method: Any, spec: Any) -> set[str]:
    """Class paths of the callbacks a method declares (its spec's and its constraint's)."""
    from app.adapters.checks import needed_callbacks

    return set(needed_callbacks(spec, method.constraint() if method is not None else None))


def fragment_parts(name: str, rank: int, targets: Sequence[str]
                   ) -> tuple[Any, Callable, list, Any]:
    """``(adapter or None, optimizer factory, callbacks, spec)`` of ``configs/methods/NAME``.

    The rank goes to the method's declared ``rank_field`` (``adapter.r`` or ``optimizer.rank``),
    the targets with it, and the fragment's ``alpha / r`` is kept. Only the callbacks
    the method declares are built, with the fragment's options.
    """
    from app.adapters import resolve_method

    config = _fragment(name)
    init = config["model"]["init_args"]
    spec = method_spec(name)
    adapter = None
    opt_args = dict(init["optimizer"].get("init_args") or {})
    if init.get("adapter"):
        args = {**(init["adapter"].get("init_args") or {}), "target_modules": list(targets)}
        if spec.rank_field == "adapter.r":
            for key in ("alpha", "lora_alpha"):  # the fragment's alpha / r, at this rank
                if args.get(key) is not None and args.get("r"):
                    scaled = args[key] * rank / args["r"]
                    args[key] = int(scaled) if float(scaled).is_integer() else scaled
            args["r"] = rank
        adapter = import_path(init["adapter"]["class_path"])(**args)
    elif spec.rank_field is not None:
        opt_args[spec.rank_field.split(".", 1)[1]] = rank
        opt_args["target_modules"] = list(targets)
    optimizer = partial(import_path(init["optimizer"]["class_path"]), **opt_args)
    method = resolve_method(adapter) if adapter is not None else None
    wanted = declared_callbacks(method, spec)
    callbacks = [import_path(c["class_path"])(**(c.get("init_args") or {}))
                 for c in (config.get("trainer") or {}).get("callbacks", [])
                 if c["class_path"] in wanted]
    return adapter, optimizer, callbacks, spec


def geometry_fragments(adapters_only: bool = False) -> list[str]:
    """Fragments whose method declares a constraint or a needed callback (or, for full-weight
    methods, a rank: GaLore / GaRare), sorted; ``adapters_only`` keeps the adapter methods."""
    from app.adapters import resolve_method

    chosen = []
    for path in sorted(METHODS_DIR.glob("*.yaml")):
        init = _fragment(path.stem)["model"]["init_args"]
        spec = method_spec(path.stem)
        if init.get("adapter"):
            adapter = import_path(init["adapter"]["class_path"])(
                **(init["adapter"].get("init_args") or {}))
            if declared_callbacks(resolve_method(adapter), spec):
                chosen.append(path.stem)
        elif not adapters_only and spec.full_weights and spec.rank_field is not None:
            chosen.append(path.stem)
    return chosen


def baseline(name: str) -> str:
    """The fragment a method is timed against: LoRA for adapters, AdamW full fine-tuning for
    full-weight methods."""
    return "lora" if _fragment(name)["model"]["init_args"].get("adapter") else "full"


def all_fragments() -> list[str]:
    """Every fragment in ``configs/methods/``, sorted."""
    return sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))


def describe(name: str) -> str:
    """``"<fragment> (<method>) r=<rank> [on <targets>] + head"`` as the fragment sets it."""
    init = _fragment(name)["model"]["init_args"]
    spec = method_spec(name)
    if spec.rank_field is None:
        return f"{name} ({spec.name}): all weights"
    section, _, field = spec.rank_field.partition(".")
    args = (init.get(section) or {}).get("init_args") or {}
    targets = args.get("target_modules")
    where = f" on {', '.join(targets)}" if isinstance(targets, list) else ""
    return f"{name} ({spec.name}) r={args.get(field, '?')}{where} + head"
