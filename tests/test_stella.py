"""StelLA: the adapter layer, its PEFT export, and the Riemannian-step callback in training."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_dump import fails_before_training, fit_tiny, run_two_ranks
from tiny import glue_run_config, tiny_config

from app.adapters import adapter_state_keys
from app.adapters.stella import StellaConfig, StellaLinear
from app.callbacks.factors import tall
from app.callbacks.stella import StellaCallback
from app.errors import ConfigError
from app.manifolds import fused, stiefel

ROOT = Path(__file__).resolve().parents[1]


def _stella(**kwargs) -> StellaConfig:
    return StellaConfig(**{"r": 4, "alpha": 8.0, **kwargs})


def _factors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "stella_" in n}


def _max_drift(module: torch.nn.Module) -> float:
    return max(float(stiefel.drift(tall(p.detach().double())))
               for n, p in module.named_parameters() if "stella_U" in n or "stella_V" in n)


def _tiny_bert_classifier():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_config("bert", 200))


# -- config and layer -------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"alpha": -1.0}, "alpha"), ({"s_mode": "block"}, "s_mode"),
    ({"init": "svd"}, "init"), ({"dropout": 1.0}, "dropout"), ({"target_modules": []},
                                                              "target_modules"),
])
def test_config_is_checked(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"adapter\.init_args\.{field}"):
        StellaConfig(**kwargs)


@pytest.mark.parametrize("s_mode", ["full", "diagonal"])
def test_layer_forward_merge_unmerge(s_mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(12, 10)
    u = stiefel.random_orthonormal(10, 3, gen)
    vt = stiefel.random_orthonormal(12, 3, gen).T
    layer = StellaLinear(base, 3, scale=2.0, s_mode=s_mode, dropout=0.0, u=u, vt=vt)
    with torch.no_grad():
        layer.stella_S.add_(torch.randn(layer.stella_S.shape, generator=gen))
    s = layer.stella_S.detach()
    s_mat = torch.diag(s) if s_mode == "diagonal" else s
    x = torch.randn(5, 12, generator=gen)
    expected = base(x) + 2.0 * x @ (u @ s_mat @ vt).T
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), w0 + 2.0 * u @ s_mat @ vt)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected)


def test_apply_targets_heads_and_seeded_init() -> None:
    model = _stella(seed=3).apply(_tiny_bert_classifier(), ["classifier"])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, StellaLinear)]
    assert wrapped and all(n.endswith((".query", ".value")) for n in wrapped)  # PEFT default
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "stella_" in n or n.startswith("classifier.")}
    assert any(n.startswith("classifier.") for n in trainable)
    assert StellaConfig.spec.state_markers == ("stella_",)  # declared, not set on the model
    assert not hasattr(model, "adapter_state_markers") and not hasattr(model, "stella_head_modules")
    kept = adapter_state_keys(model, StellaConfig.spec)
    assert {k for k in model.state_dict() if "stella_" in k} <= kept
    layer = model.get_submodule(wrapped[0])
    eye = torch.eye(4)
    torch.testing.assert_close(layer.stella_U.weight.T @ layer.stella_U.weight, eye)
    torch.testing.assert_close(layer.stella_V.weight @ layer.stella_V.weight.T, eye)
    torch.testing.assert_close(layer.stella_S.detach(), eye)
    again = _stella(seed=3).apply(_tiny_bert_classifier(), ["classifier"])
    other = _stella(seed=4).apply(_tiny_bert_classifier(), ["classifier"])
    assert all(torch.equal(v, _factors(again)[k]) for k, v in _factors(model).items())
    assert not torch.equal(_factors(model)[f"{wrapped[0]}.stella_U.weight"],
                           _factors(other)[f"{wrapped[0]}.stella_U.weight"])


@pytest.mark.parametrize("init", ["top", "bottom"])
def test_svd_init_uses_singular_vectors(init: str) -> None:
    model = _stella(init=init, target_modules=["query"]).apply(_tiny_bert_classifier(), [])
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    w = layer.base_layer.weight.detach()
    sv = torch.linalg.svdvals(w)
    core = layer.stella_U.weight.T @ w @ layer.stella_V.weight.T  # U^T W V
    expected = sv[:4] if init == "top" else sv[-4:]
    torch.testing.assert_close(core.abs(), torch.diag(expected), atol=1e-5, rtol=1e-5)


def test_vit_default_targets_are_q_v_proj() -> None:
    from transformers import AutoModelForImageClassification, ViTConfig

    vit = AutoModelForImageClassification.from_config(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3))
    model = _stella().apply(vit, ["classifier"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, StellaLinear))
    assert wrapped == ["vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"]


def test_apply_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match=r"r=64 exceeds layer bert\.encoder\.layer\.0\."
                                          r"attention\.self\.query \(Linear in=32, out=32"):
        StellaConfig(r=64).apply(_tiny_bert_classifier(), ["classifier"])
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\] match no module"):
        _stella(target_modules=["nope"]).apply(_tiny_bert_classifier(), ["classifier"])
    with pytest.raises(ConfigError, match="wraps nn.Linear only"):
        _stella(target_modules=["attention"]).apply(_tiny_bert_classifier(), ["classifier"])


def test_export_reproduces_logits_with_peft(tiny_ckpt, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from app.modules.classification import ClassificationModule

    ckpt = tiny_ckpt("bert")
    module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                  adapter=_stella(s_mode="full"))
    module.configure_model()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial adapter and head
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    folder = module.save_adapter(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["modules_to_save"] == ["bert.pooler", "classifier"]
    assert (folder / "config.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(
        ckpt, config=AutoConfig.from_pretrained(folder))
    loaded = PeftModel.from_pretrained(base, folder).eval()
    module.eval()
    batch = {"input_ids": torch.randint(5, 100, (3, 12), generator=gen),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        expected, got = module.model(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with loaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(loaded(**batch).logits, expected, atol=1e-3)  # non-trivial


# -- the Riemannian step ----------------------------------------------------------------------
@pytest.mark.parametrize(("retraction", "hidden_size", "solver"),
                         [("polar", None, "eigh"), ("polar", 4, "newton_schulz"),
                          ("exp", 4, "eigh")])
def test_one_step_matches_the_formula(retraction: str, hidden_size: int | None,
                                      solver: str) -> None:
    """SGD step through the hooks == polar/exp(X + P_X(-lr * rgrad / sqrt(n/c))) in float64."""
    gen = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(12, 10)
    layer = StellaLinear(base, 3, 1.0, "full", 0.0, stiefel.random_orthonormal(10, 3, gen),
                         stiefel.random_orthonormal(12, 3, gen).T)
    factors = [("stella_U.weight", layer.stella_U.weight), ("stella_V.weight",
                                                           layer.stella_V.weight)]
    callback = StellaCallback(retraction=retraction, hidden_size=hidden_size,
                              gradient_scaling=hidden_size is not None, polar_solver=solver)
    callback._factors, callback._c = factors, hidden_size
    lr = 0.2
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    callback._hooks.attach([optimizer])
    layer(torch.randn(7, 12, generator=gen)).pow(2).sum().backward()
    before = {n: (tall(p.detach()).double(), tall(p.grad).double()) for n, p in factors}
    s_expected = layer.stella_S.detach() - lr * layer.stella_S.grad
    optimizer.step()
    for name, p in factors:
        x, g = before[name]
        d = -lr * (g - x @ g.T @ x)
        if hidden_size is not None:
            d = d / math.sqrt(x.shape[0] / hidden_size)
        xi = d - x @ stiefel.sym(x.T @ d)
        if retraction == "polar":
            u, _, vh = torch.linalg.svd(x + xi, full_matrices=False)
            expected = u @ vh
        else:
            expected = stiefel.retract_exp(x, xi)
        torch.testing.assert_close(tall(p.detach()).double(), expected, atol=2e-6, rtol=0)
        assert float(stiefel.drift(tall(p.detach()))) < 1e-5
    torch.testing.assert_close(layer.stella_S.detach(), s_expected)  # S: plain Euclidean
    assert callback.num_steps == 1
    callback._hooks.detach()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_100_adamw_steps_stay_on_the_manifold(precision: str, tiny_ckpt, glue_dir: Path,
                                              tmp_path: Path) -> None:
    callback = StellaCallback()
    init = _factors(_stella().apply(_tiny_bert_classifier(), ["classifier"]))
    trainer, module = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, _stella(), [callback],
                               max_steps=100, precision=precision)
    assert trainer.global_step == 100 and callback.num_steps == 100
    assert _max_drift(module) < 1e-5
    after = {k.removeprefix("model."): v for k, v in _factors(module).items()}
    moved = max(float((after[k] - v).abs().max()) for k, v in init.items() if "stella_U" in k)
    assert moved > 1e-2  # the factors really trained (else the drift check is empty)
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    states = trainer.optimizers[0].state.values()
    assert states and all(t.dtype == torch.float32 for s in states for t in s.values()
                          if torch.is_tensor(t) and t.is_floating_point())


def test_once_per_optimizer_step_with_accumulation(tiny_ckpt, glue_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"rgrad": 0, "retract": 0}

    def counting(name: str, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(fused, "riemannian_grad_", counting("rgrad", fused.riemannian_grad_))
    monkeypatch.setattr(fused, "retract_fused", counting("retract", fused.retract_fused))
    callback = StellaCallback()
    trainer, module = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, _stella(), [callback],
                               max_steps=3, accumulate_grad_batches=4)
    assert trainer.global_step == 3 and callback.num_steps == 3
    # one pre-step and one post-step call over all factors per real optimizer step
    assert calls == {"rgrad": 3, "retract": 3}
    # 6 micro-batches per epoch: steps after batches 4, 6 (end of epoch flushes) and 10.
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 10


def test_resume_reproduces_uninterrupted_run(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = tiny_ckpt("bert")
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=6,
                            save_top_k=-1, filename="{step}")
    whole_cb = StellaCallback()
    _, whole = fit_tiny(ckpt, glue_dir, tmp_path / "a", _stella(dropout=0.1), [whole_cb, saver],
                        max_steps=12, enable_checkpointing=True)
    path = tmp_path / "ckpts" / "step=6.ckpt"  # the end of the first epoch (6 batches)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["state_dict"] and all("stella_" in k or "classifier" in k or ".pooler." in k
                                       for k in saved["state_dict"])
    assert saved["callbacks"][whole_cb.state_key] == {"num_steps": 6}
    resumed_cb = StellaCallback()
    _, resumed = fit_tiny(ckpt, glue_dir, tmp_path / "b", _stella(dropout=0.1), [resumed_cb],
                          max_steps=12, ckpt_path=str(path))
    assert resumed_cb.num_steps == whole_cb.num_steps == 12
    expected = dict(whole.named_parameters())
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name]), name
            assert not torch.equal(p.detach(), saved["state_dict"][name])  # it trained on


def test_lightning_step_uses_the_riemannian_gradient(tiny_ckpt, glue_dir: Path,
                                                     tmp_path: Path) -> None:
    """Under Lightning's closure the pre-step work sees this step's gradient (not None or the
    previous step's): one SGD step equals polar(X + P_X(-lr (G - X G^T X)))."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Capture(L.Callback):
        def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            for n, p in pl_module.named_parameters():
                if "stella_U" in n or "stella_V" in n:
                    seen[n] = (tall(p.detach()).double().clone(), tall(p.grad).double().clone())

    lr = 2000.0  # the tiny model's factor gradients are ~1e-6
    _, module = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, _stella(),
                         [StellaCallback(gradient_scaling=False), Capture()], max_steps=1,
                         optimizer=functools.partial(torch.optim.SGD, lr=lr))
    params = dict(module.named_parameters())
    assert len(seen) == 8
    for name, (x, g) in seen.items():
        d = -lr * (g - x @ g.T @ x)
        u, _, vh = torch.linalg.svd(x + d - x @ stiefel.sym(x.T @ d), full_matrices=False)
        got = tall(params[name].detach()).double()
        torch.testing.assert_close(got, u @ vh, atol=2e-6, rtol=0)
        assert float((got - x).abs().max()) > 1e-3  # a real step, not a no-op


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_factors(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    config = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs",
                             adapter={"class_path": "app.adapters.stella.StellaConfig",
                                      "init_args": {"r": 4, "alpha": 8.0}}, max_steps=4)
    config["trainer"]["callbacks"] = [{"class_path": "app.callbacks.stella.StellaCallback"}]
    config["trainer"]["limit_val_batches"] = 0
    config["save_adapter"] = {"enabled": False}
    rank0, _, _ = run_two_ranks(config, tmp_path, steps=4)  # identical on both ranks
    factors = [n for n in rank0["trainable"] if "stella_U" in n or "stella_V" in n]
    assert len(factors) == 8
    for name in factors:
        assert float(stiefel.drift(tall(rank0["params"][name]))) < 1e-5


# -- start-up errors ----------------------------------------------------------------------------
def _data(ckpt: Path, glue_dir: Path) -> L.LightningDataModule:
    from app.data.glue import GLUEDataModule

    return GLUEDataModule(task="rte", data_dir=str(glue_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)


def test_error_when_the_adapter_is_not_stella(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    ckpt = tiny_ckpt("bert")
    fails_before_training(ckpt, glue_dir, tmp_path, LoraConfig(r=4, lora_alpha=8),
                           [StellaCallback()], "StellaCallback needs model.init_args.adapter "
                           "class_path app.adapters.stella.StellaConfig, got LoraConfig")
    fails_before_training(ckpt, glue_dir, tmp_path, _stella(),
                           [StellaCallback(patterns=["stella_X"])],
                           r"no trainable parameter matches StellaCallback patterns=\['stella_X'\]")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_error_for_half_precision_weights(precision: str, tiny_ckpt, glue_dir: Path,
                                          tmp_path: Path) -> None:
    fails_before_training(tiny_ckpt("bert"), glue_dir, tmp_path, _stella(), [StellaCallback()],
                           rf"trainer.precision='{precision}'; use trainer.precision=bf16-mixed",
                           precision=precision)


def test_error_for_fp16_amp_and_sharded_strategies() -> None:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    module = types.SimpleNamespace()  # no `adapter`: only trainer checks run
    fake = types.SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision="16-mixed")
    with pytest.raises(ConfigError, match="trainer.precision='16-mixed'"):
        StellaCallback().setup(fake, module, "fit")
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        fake = types.SimpleNamespace(strategy=strategy, precision="32-true")
        with pytest.raises(ConfigError, match=rf"trainer.strategy={type(strategy).__name__}.*"
                                              "use FSDP2 \\(configs/strategy/fsdp2.yaml\\)"):
            StellaCallback().setup(fake, module, "fit")
    fake = types.SimpleNamespace(strategy=DDPStrategy(), precision="bf16-mixed")
    StellaCallback().setup(fake, module, "fit")  # DDP and bf16-mixed are fine


def test_error_when_the_factors_get_weight_decay(tiny_ckpt, glue_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StellaConfig, "spec", dataclasses.replace(StellaConfig.spec, no_decay=()))
    fails_before_training(tiny_ckpt("bert"), glue_dir, tmp_path, _stella(), [StellaCallback()],
                           r"applies weight_decay=0.01 to constrained factor .*stella_")


def test_callback_options_and_state_dict() -> None:
    with pytest.raises(ConfigError, match="retraction"):
        StellaCallback(retraction="qr")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="polar_solver must be .*got 'qr'"):
        StellaCallback(polar_solver="qr")  # type: ignore[arg-type]
    callback = StellaCallback()
    callback.num_steps = 7
    restored = StellaCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.num_steps == 7 and restored.state_dict() == {"num_steps": 7}
    restored.load_state_dict({})  # checkpoints from before a key existed
    assert restored.num_steps == 0


def test_method_fragment_parses(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from app.callbacks.drift_monitor import OrthogonalityDrift
    from app.cli import AppCLI

    cli = AppCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                 subclass_mode_data=True, run=False, args=[
                     "--config", str(ROOT / "configs/data/glue_rte.yaml"),
                     "--config", str(ROOT / "configs/methods/stella.yaml"),
                     "--model.init_args.checkpoint", str(tiny_ckpt("bert")),
                     "--data.init_args.data_dir", str(glue_dir),
                     "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.model.adapter, StellaConfig) and cli.model.adapter.r == 8
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {StellaCallback, OrthogonalityDrift} <= kinds
    assert isinstance(cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]),
                      torch.optim.AdamW)
