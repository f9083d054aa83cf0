"""The method contract: every shipped fragment resolves to a declared method, the start-up
checks read those declarations, nothing is attached to the model or to the user's config, and
stateful callbacks keep instances apart in checkpoints (old checkpoints still load)."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from peft import LoraConfig

from app.adapters import declared_spec, resolve_method
from app.adapters.checks import check_precision, check_strategy, missing_callbacks
from app.adapters.contract import Constraint, MethodSpec, strategy_kind
from app.adapters.full import FULL_SPEC
from app.adapters.peft_family import LORA_SPEC, PeftMethod
from app.callbacks.drift_monitor import OrthogonalityDrift
from app.callbacks.stella import StellaCallback
from app.compare.plan import _class_of, load_fragments, rank_option
from app.draws import seed_of
from app.errors import ConfigError
from app.optim.galore import GaRareAdamW, projection_seed

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = sorted((ROOT / "configs/methods").glob("*.yaml"))


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.stem)
def test_every_fragment_declares_its_method(path: Path) -> None:
    """Each fragment's classes carry a MethodSpec; its rank option names a field the
    fragment really sets, and every callback the method needs exists."""
    config = load_fragments([path])
    args = config["model"]["init_args"]
    spec = declared_spec(_class_of(args.get("adapter")), _class_of(args.get("optimizer")))
    assert isinstance(spec, MethodSpec)
    option = rank_option(config)
    if spec.rank_field is None:
        assert option is None and args.get("adapter") is None
    else:
        owner, _, field = spec.rank_field.partition(".")
        assert field in args[owner]["init_args"], (spec.rank_field, path.name)
        assert option == f"--model.init_args.{owner}.init_args.{field}"
    assert not missing_callbacks(spec, None, [cls() for cls in map(_load, spec.callbacks)])
    assert missing_callbacks(spec, None, []) == list(spec.callbacks)


def _load(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_resolution_of_each_kind_of_method() -> None:
    full = resolve_method(None, functools.partial(torch.optim.AdamW, lr=1e-3))
    assert full.spec is FULL_SPEC and full.constraint() is None
    garare = resolve_method(None, functools.partial(GaRareAdamW, rank=4))
    assert garare.spec.rank_field == "optimizer.rank" and garare.spec.full_weights
    lora = resolve_method(LoraConfig(r=4))
    assert isinstance(lora, PeftMethod) and lora.spec is LORA_SPEC
    with pytest.raises(ConfigError, match="optimise full weights"):
        resolve_method(LoraConfig(r=4), functools.partial(GaRareAdamW, rank=4))
    with pytest.raises(ConfigError, match="neither a peft.PeftConfig"):
        resolve_method(object())


def test_apply_leaves_the_users_config_alone() -> None:
    from tiny import tiny_config
    from transformers import AutoModelForSequenceClassification

    config = LoraConfig(r=4, target_modules=["query", "value"])
    model = PeftMethod(config).apply(
        AutoModelForSequenceClassification.from_config(tiny_config("bert", 120)), ["classifier"])
    assert config.modules_to_save is None  # the copy given to PEFT has the head
    assert model.peft_config["default"].modules_to_save == ["classifier"]


def test_checks_read_the_declaration() -> None:
    spec = MethodSpec(name="X", strategies=frozenset({"single", "ddp"}), strategy_owner="XCb",
                      strategy_reason="because; use ddp", precisions=("32-true",))
    check_strategy(spec, DDPStrategy())
    check_strategy(spec, SingleDeviceStrategy("cpu"))
    with pytest.raises(ConfigError, match=r"XCb does not support trainer.strategy=FSDPStrategy: "
                                          r"because; use ddp"):
        check_strategy(spec, FSDPStrategy())
    check_precision(spec, "32-true")
    with pytest.raises(ConfigError, match=r"X does not support trainer.precision='bf16-mixed'"):
        check_precision(spec, "bf16-mixed")
    assert strategy_kind(FSDPStrategy()) == "fsdp" and strategy_kind(object()) == "other"


def test_missing_callbacks_are_named_once() -> None:
    spec = MethodSpec(name="X", callbacks=("app.callbacks.stella.StellaCallback",))
    constraint = Constraint(("f",), "stiefel", callback="app.callbacks.stella.StellaCallback")
    assert missing_callbacks(spec, constraint, [OrthogonalityDrift()]) == [
        "app.callbacks.stella.StellaCallback"]
    assert missing_callbacks(spec, constraint, [StellaCallback(retraction="exp")]) == []


def test_state_keys_tell_instances_apart_and_old_checkpoints_load() -> None:
    a, b = OrthogonalityDrift(threshold=0.1), OrthogonalityDrift(threshold=0.2)
    assert a.state_key != b.state_key and a.state_key.startswith("OrthogonalityDrift")
    assert StellaCallback().state_key != StellaCallback(retraction="exp").state_key
    old = {"callbacks": {"StellaCallback": {"num_steps": 5}}}
    callback = StellaCallback()
    callback.on_load_checkpoint(types.SimpleNamespace(), types.SimpleNamespace(), old)
    callback.load_state_dict(old["callbacks"][callback.state_key])
    assert callback.num_steps == 5


def test_one_seed_mixer_for_every_draw() -> None:
    assert projection_seed(3, "q.weight", 2) == seed_of(3, "q.weight", 2)
    assert seed_of(0, "a") != seed_of(0, "b") != seed_of(1, "a")
    assert 0 <= seed_of(2**40, "x", 7) < 2**63


def test_fragments_state_the_manifold_once() -> None:
    for path in FRAGMENTS:
        raw = yaml.safe_load(path.read_text())
        for callback in (raw.get("trainer") or {}).get("callbacks") or []:
            if callback["class_path"].endswith("LandingCallback"):
                assert "manifold" not in (callback.get("init_args") or {}), path.name
