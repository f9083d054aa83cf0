"""Asymmetric LoRA (app.adapters.lora.AsymmetricLoraConfig): which factor is frozen, its
orthonormality, reproducibility (global RNG, ranks, reload) and the YAML fragment under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from ddp_dump import run_two_ranks
from tiny import glue_run_config

from app.adapters.lora import AsymmetricLoraConfig, draw_frozen_factor, factor_seed, lora_layers
from app.errors import ConfigError
from app.modules.classification import ClassificationModule

ROOT = Path(__file__).resolve().parents[1]
R = 4


def _module(ckpt: Path, **kw) -> ClassificationModule:
    cfg = {"r": R, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["query", "value"],
           **kw}
    module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                  adapter=AsymmetricLoraConfig(**cfg))
    module.configure_model()
    return module


def _factors(module: ClassificationModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.lora_A[a].weight, layer.lora_B[a].weight)
            for name, layer, a in lora_layers(module.model)}


def test_frozen_a_is_orthonormal_and_b_zero_and_trained(tiny_ckpt) -> None:
    module = _module(tiny_ckpt("bert"))
    factors = _factors(module)
    assert len(factors) == 4  # query and value in 2 layers
    for name, (a, b) in factors.items():
        assert a.shape == (R, 32) and b.shape == (32, R)
        assert not a.requires_grad, name
        assert b.requires_grad, name
        assert a.dtype == torch.float32
        torch.testing.assert_close(a @ a.T, torch.eye(R), atol=1e-6, rtol=0)
        assert torch.count_nonzero(b) == 0
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert not any("lora_A" in n for n in trainable)
    assert sum("lora_B" in n for n in trainable) == 4
    assert any("classifier" in n for n in trainable)  # the head is trained
    in_groups = {n for g in module.parameter_groups() for n, _ in g["params"]}
    assert in_groups == trainable
    # PEFT re-marks adapters trainable in set_adapter; the registered frozen A stays frozen
    module.model.set_adapter("default")
    assert all(not a.requires_grad and b.requires_grad for a, b in _factors(module).values())
    # the frozen A is part of the checkpoint (it is not in the pretrained base)
    keys = module.trainable_state_keys
    assert sum("lora_A" in k for k in keys) == 4


def test_frozen_b_variant_and_gaussian_init(tiny_ckpt) -> None:
    module = _module(tiny_ckpt("bert"), frozen_factor="B")
    for name, (a, b) in _factors(module).items():
        assert a.requires_grad and not b.requires_grad, name
        torch.testing.assert_close(b.T @ b, torch.eye(R), atol=1e-6, rtol=0)
        assert torch.count_nonzero(a) == 0
    gauss = _module(tiny_ckpt("bert"), frozen_init="gaussian")
    a = next(iter(_factors(gauss).values()))[0]
    assert not a.requires_grad
    assert (a @ a.T - torch.eye(R)).abs().max() > 1e-3  # not orthonormal
    # N(0, 1/in) entries: E[A A^T] = I_r, i.e. mean squared entry 1/in
    big = draw_frozen_factor(4096, 8, "gaussian", torch.Generator().manual_seed(0))
    assert abs(big.square().mean().item() * 4096 - 1) < 0.05


def test_draw_depends_only_on_seed_and_layer_name(tiny_ckpt) -> None:
    torch.manual_seed(1)
    first = {n: a.clone() for n, (a, _) in _factors(_module(tiny_ckpt("bert"))).items()}
    torch.manual_seed(2)  # another rank / process: a different global RNG state
    second = {n: a.clone() for n, (a, _) in _factors(_module(tiny_ckpt("bert"))).items()}
    for name in first:
        assert torch.equal(first[name], second[name]), name
        gen = torch.Generator().manual_seed(factor_seed(0, name))
        assert torch.equal(first[name], draw_frozen_factor(32, R, "orthonormal", gen).T)
    values = list(first.values())
    assert not torch.allclose(values[0], values[1])  # every layer has its own A
    other = _factors(_module(tiny_ckpt("bert"), init_seed=1))
    assert all(not torch.allclose(first[n], other[n][0]) for n in first)


def test_saved_adapter_restores_the_frozen_a(tiny_ckpt, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ckpt = tiny_ckpt("bert")
    module = _module(ckpt)
    with torch.no_grad():  # as if trained: B non-zero
        for _, b in _factors(module).values():
            b.normal_()
    folder = module.save_adapter(tmp_path / "adapter")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert not {"frozen_factor", "frozen_init", "init_seed"} & set(saved)  # plain LoRA config
    assert isinstance(LoraConfig.from_pretrained(str(folder)), LoraConfig)
    base = AutoModelForSequenceClassification.from_pretrained(
        ckpt, config=AutoConfig.from_pretrained(folder))
    loaded = PeftModel.from_pretrained(base, folder).eval()
    ours = dict(module.model.named_parameters())
    restored = dict(loaded.named_parameters())
    names = [n for n in ours if "lora_A" in n]
    assert len(names) == 4
    for name in names:
        assert torch.equal(restored[name], ours[name]), name
    batch = {"input_ids": torch.randint(5, 100, (2, 10)),
             "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module.model(**batch).logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"frozen_factor": "C"}, "frozen_factor must be 'A' or 'B'"),
    ({"frozen_init": "uniform"}, "frozen_init must be"),
    ({"init_seed": -1}, "init_seed must be"),
    ({"init_lora_weights": "pissa"}, "leave init_lora_weights at true"),
    ({"use_dora": True}, "use_dora"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsymmetricLoraConfig(r=4, **kwargs)


def test_rank_above_layer_width_is_refused(tiny_ckpt) -> None:
    with pytest.raises(ConfigError, match=r"r=40 exceeds the 32 features"):
        _module(tiny_ckpt("bert"), r=40)


@pytest.mark.slow
def test_ddp_two_ranks_same_frozen_a_and_identical_parameters(
        tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """Two CPU processes through the real CLI with configs/methods/asymmetric.yaml."""
    ckpt = tiny_ckpt("bert")
    method = yaml.safe_load((ROOT / "configs/methods/asymmetric.yaml").read_text())
    adapter = method["model"]["init_args"]["adapter"]
    adapter["init_args"].update(r=R, target_modules=["query", "value"], init_seed=3)
    cfg = glue_run_config(ckpt, glue_dir, tmp_path / "runs", adapter=adapter, max_steps=3)
    cfg["model"]["init_args"]["optimizer"] = method["model"]["init_args"]["optimizer"]
    rank0, _, _ = run_two_ranks(cfg, tmp_path, steps=3)  # identical on both ranks
    p0 = rank0["params"]
    trainable = set(rank0["trainable"])
    a_names = [n for n in p0 if "lora_A" in n]
    assert len(a_names) == 4 and not trainable & set(a_names)
    for name in a_names:  # still exactly the seeded draw: frozen through training
        layer = name.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
        gen = torch.Generator().manual_seed(factor_seed(3, layer))
        assert torch.equal(p0[name], draw_frozen_factor(32, R, "orthonormal", gen).T), name
    assert all(p0[n].abs().sum() > 0 for n in p0 if "lora_B" in n)  # B was trained
