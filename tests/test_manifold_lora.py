"""Manifold-LoRA: the orthonormal-B / zero-A init, the landing callback, A-step balancing."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_dump import fails_before_training, fit_tiny, run_two_ranks
from tiny import glue_run_config, tiny_config

from app.adapters.manifold_lora import ManifoldLoraConfig
from app.callbacks.drift_monitor import OrthogonalityDrift
from app.callbacks.landing import LandingCallback, a_step_scale
from app.errors import ConfigError
from app.manifolds import sphere, stiefel

ROOT = Path(__file__).resolve().parents[1]


def _adapter(manifold: str = "stiefel", **kwargs) -> ManifoldLoraConfig:
    return ManifoldLoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                 "manifold": manifold, **kwargs})


def _b_factors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}


def _drift(x: torch.Tensor, manifold: str) -> float:
    return float((stiefel if manifold == "stiefel" else sphere).drift(x.double()))


# -- config and init ---------------------------------------------------------------------------
def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.init_args\.manifold"):
        _adapter(manifold="grassmann")
    with pytest.raises(ConfigError, match="use_dora"):
        _adapter(use_dora=True)
    with pytest.raises(ConfigError, match="init_lora_weights='pissa'"):
        _adapter(init_lora_weights="pissa")
    assert type(_adapter()).spec.no_decay == ("lora_B",)


@pytest.mark.parametrize("manifold", ["stiefel", "sphere"])
def test_init_orthonormal_b_zero_a_and_export(manifold: str, tiny_ckpt, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from app.modules.classification import ClassificationModule

    ckpt = tiny_ckpt("bert")

    def build(seed: int) -> ClassificationModule:
        module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                      adapter=_adapter(manifold, init_seed=seed))
        module.configure_model()
        return module

    module = build(0)
    b = _b_factors(module)
    assert len(b) == 4
    for name, value in b.items():
        torch.testing.assert_close(value.T @ value, torch.eye(4))
        a = dict(module.named_parameters())[name.replace("lora_B", "lora_A")]
        assert torch.count_nonzero(a) == 0
    again, other = _b_factors(build(0)), _b_factors(build(1))
    assert all(torch.equal(v, again[k]) for k, v in b.items())
    assert not any(torch.equal(v, other[k]) for k, v in b.items())
    # dW = 0: the adapted model equals the base model with the same head.
    batch = {"input_ids": torch.randint(5, 100, (3, 12)),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    module.eval()
    with torch.no_grad():
        adapted = module.model(**batch).logits
        with module.model.disable_adapter():
            plain = module.model(**batch).logits
        for n, p in module.named_parameters():  # a trained state, then export it
            if "lora_A" in n:
                p.add_(0.1)
    torch.testing.assert_close(adapted, plain)
    folder = module.save_adapter(tmp_path / "adapter")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "manifold" not in saved and "init_seed" not in saved
    base = AutoModelForSequenceClassification.from_pretrained(
        ckpt, config=AutoConfig.from_pretrained(folder))
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module.model(**batch).logits)


def test_rank_larger_than_out_features_is_refused() -> None:
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", 200))
    config = _adapter(r=40, target_modules=["query"])
    peft_model = get_peft_model(model, config)
    with pytest.raises(ConfigError, match=r"r=40 exceeds layer .*query's out_features=32"):
        config.initialize(peft_model)


# -- the landing step ----------------------------------------------------------------------------
def _toy(manifold: str, balance: bool, a_scale: float = 0.0, lr: float = 0.05):
    """A single PEFT-named pair (B tall, A wide), an SGD step through the callback's hooks."""
    gen = torch.Generator().manual_seed(4)
    net = torch.nn.Module()
    net.lora_B = torch.nn.Parameter(stiefel.random_orthonormal(10, 3, gen))
    net.lora_A = torch.nn.Parameter(a_scale * torch.randn(3, 7, generator=gen))
    callback = LandingCallback(manifold=manifold, balance_a_lr=balance)
    callback._factors = [("lora_B", net.lora_B)]
    callback._pairs = [net.lora_A] if balance else []
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    callback._hooks.attach([optimizer])
    x = torch.randn(5, 7, generator=gen)
    (x @ net.lora_A.T @ net.lora_B.T + x[:, :1]).pow(2).sum().backward()  # dL/dB != 0 at A = 0
    before = {n: (p.detach().double().clone(), p.grad.double().clone())
              for n, p in net.named_parameters()}
    optimizer.step()
    callback._hooks.detach()
    return net, before, callback


@pytest.mark.parametrize("manifold", ["stiefel", "sphere"])
def test_landing_step_matches_the_formula(manifold: str) -> None:
    net, before, callback = _toy(manifold, balance=False, a_scale=1.0)
    (b, g_b), (a, g_a) = before["lora_B"], before["lora_A"]
    d = -0.05 * g_b
    if manifold == "stiefel":
        expected = b + d - b @ stiefel.sym(b.T @ d) - (b @ (b.T @ b - torch.eye(3)) / 3)
    else:
        col = (b * d).sum(0, keepdim=True)
        expected = b + (d - col * b) - b * ((b * b).sum(0, keepdim=True) - 1) / 3
    torch.testing.assert_close(net.lora_B.detach().double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(net.lora_A.detach().double(), a - 0.05 * g_a)  # untouched
    assert callback.num_steps == 1


def test_penalty_contracts_the_drift_by_one_third() -> None:
    gen = torch.Generator().manual_seed(0)
    x = stiefel.random_orthonormal(20, 4, gen, dtype=torch.float64) * (1 + 1e-4)
    y = stiefel.landing_step(x, torch.zeros_like(x), mu=1 / 3)
    assert abs(_drift(y, "stiefel") / _drift(x, "stiefel") - 1 / 3) < 1e-3


@pytest.mark.parametrize(("a_scale", "expected"), [(0.0, 1.0), (1e-3, 1.0), (5.0, None)])
def test_balance_a_lr_scales_a_step(a_scale: float, expected: float | None) -> None:
    plain, before, _ = _toy("stiefel", balance=False, a_scale=a_scale)
    balanced, _, _ = _toy("stiefel", balance=True, a_scale=a_scale)
    a_old = before["lora_A"][0]
    b_norm = torch.linalg.matrix_norm(before["lora_B"][0], ord=2)
    a_norm = torch.linalg.matrix_norm(a_old, ord=2)
    c = float(torch.clamp(b_norm / a_norm, max=1.0)) if a_norm > 0 else 1.0
    if expected is not None:
        assert c == pytest.approx(expected)
    else:
        assert c < 0.5  # A dominates: its step is damped
    step_plain = plain.lora_A.detach().double() - a_old
    step_balanced = balanced.lora_A.detach().double() - a_old
    assert float(step_plain.abs().max()) > 0
    torch.testing.assert_close(step_balanced, c * step_plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(balanced.lora_B, plain.lora_B)  # B is not affected
    got = a_step_scale(before["lora_B"][0][None].float(), a_old[None].float())
    assert float(got) == pytest.approx(c, rel=1e-5)


@pytest.mark.parametrize("manifold", ["stiefel", "sphere"])
def test_100_adamw_steps_drift_below_1e3_and_logged(manifold: str, tiny_ckpt, glue_dir: Path,
                                                     tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    def run(folder: str, *callbacks: L.Callback):
        logger = CSVLogger(str(tmp_path / folder), name="", version="")
        trainer, module = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path / folder,
                                   _adapter(manifold), [*callbacks], max_steps=100, lr=2e-3,
                                   logger=logger, log_every_n_steps=10)
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("manifold/drift_max")]
        return trainer, module, rows

    landing, monitor = LandingCallback(manifold=manifold), OrthogonalityDrift(every_n_steps=20)
    _, module, rows = run("landing", monitor, landing)  # monitor first: order does not matter
    assert [int(r["step"]) for r in rows] == [19, 39, 59, 79, 99]  # logged at steps 20..100
    logged = [float(r["manifold/drift_max"]) for r in rows]
    actual = max(_drift(b, manifold) for b in _b_factors(module).values())
    assert max(logged) < 1e-3 and actual < 1e-3, logged
    assert logged[-1] == pytest.approx(monitor.last["max"], rel=1e-6)
    assert abs(logged[-1] - actual) < 1e-6  # fp32 measurement vs float64
    assert landing.num_steps == 100
    _, fresh = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path / "i", _adapter(manifold), [],
                        fit=False)
    fresh.configure_model()
    init = _b_factors(fresh)
    trained = _b_factors(module)
    assert max(float((trained[k] - v).abs().max()) for k, v in init.items()) > 1e-2
    # Control: the same run without landing drifts far more, and the monitor (by pattern) says so.
    _, control, control_rows = run("control", OrthogonalityDrift(
        every_n_steps=20, patterns=["lora_B"], manifold=manifold))
    free = max(_drift(b, manifold) for b in _b_factors(control).values())
    assert free > 1e-2 and float(control_rows[-1]["manifold/drift_max"]) == pytest.approx(
        free, rel=1e-4)


def test_once_per_optimizer_step_with_accumulation(tiny_ckpt, glue_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = stiefel.landing_step
    monkeypatch.setattr(stiefel, "landing_step", lambda *a, **k: calls.append(1) or original(
        *a, **k))
    callback = LandingCallback()
    trainer, _ = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, _adapter(), [callback],
                          max_steps=3, accumulate_grad_batches=4)
    assert trainer.global_step == 3 and callback.num_steps == 3
    assert len(calls) == 3  # all four B are 32 x 4: one batched call per step


def test_resume_reproduces_uninterrupted_run(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = tiny_ckpt("bert")
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), every_n_train_steps=6,
                            save_top_k=-1, filename="{step}")
    adapter = functools.partial(_adapter, "sphere", lora_dropout=0.1)
    whole_cb = LandingCallback("sphere", balance_a_lr=True)
    _, whole = fit_tiny(ckpt, glue_dir, tmp_path / "a", adapter(), [whole_cb, saver],
                        max_steps=12, enable_checkpointing=True)
    path = tmp_path / "ckpts" / "step=6.ckpt"
    resumed_cb = LandingCallback("sphere", balance_a_lr=True)
    _, resumed = fit_tiny(ckpt, glue_dir, tmp_path / "b", adapter(), [resumed_cb],
                          max_steps=12, ckpt_path=str(path))
    assert resumed_cb.num_steps == whole_cb.num_steps == 12
    expected = dict(whole.named_parameters())
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name]), name


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_factors(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    config = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", max_steps=4,
                             adapter={"class_path": "app.adapters.manifold_lora."
                                                    "ManifoldLoraConfig",
                                      "init_args": {"r": 4, "lora_alpha": 8}})
    config["trainer"]["callbacks"] = [{"class_path": "app.callbacks.landing.LandingCallback",
                                       "init_args": {"balance_a_lr": True}}]
    config["trainer"]["limit_val_batches"] = 0
    config["save_adapter"] = {"enabled": False}
    rank0, _, _ = run_two_ranks(config, tmp_path, steps=4)  # identical on both ranks
    assert sum("lora_B" in n for n in rank0["trainable"]) == 4


# -- start-up errors -----------------------------------------------------------------------------
def test_startup_errors(tiny_ckpt, glue_dir: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig

    ckpt = tiny_ckpt("bert")
    fails_before_training(ckpt, glue_dir, tmp_path, _adapter("sphere"),
                           [LandingCallback(manifold="stiefel")],
                           r"LandingCallback manifold='stiefel' but the adapter's model\."
                           r"init_args\.adapter\.init_args\.manifold='sphere'")
    fails_before_training(ckpt, glue_dir, tmp_path, LoraConfig(r=4), [LandingCallback()],
                           "LandingCallback needs model.init_args.adapter class_path "
                           "app.adapters.manifold_lora.ManifoldLoraConfig")
    fails_before_training(ckpt, glue_dir, tmp_path, _adapter(),
                           [LandingCallback(patterns=["lora_X"], a_patterns=["lora_A"])],
                           r"no trainable parameter matches LandingCallback patterns")
    fails_before_training(ckpt, glue_dir, tmp_path, _adapter(), [LandingCallback()],
                           r"trainer.precision='bf16-true'", precision="bf16-true")
    fake = types.SimpleNamespace(strategy=__import__(
        "lightning.pytorch.strategies", fromlist=["FSDPStrategy"]).FSDPStrategy(),
        precision="32-true")
    with pytest.raises(ConfigError, match="does not support trainer.strategy=FSDPStrategy"):
        LandingCallback().setup(fake, types.SimpleNamespace(), "fit")
    monkeypatch.setattr(ManifoldLoraConfig, "spec",
                        dataclasses.replace(ManifoldLoraConfig.spec, no_decay=()))
    fails_before_training(ckpt, glue_dir, tmp_path, _adapter(), [LandingCallback()],
                           r"applies weight_decay=0.01 to constrained factor .*lora_B")


def test_callback_options_and_state_dict() -> None:
    with pytest.raises(ConfigError, match="mu must be in"):
        LandingCallback(mu=1.5)
    with pytest.raises(ConfigError, match="manifold"):
        LandingCallback(manifold="torus")  # type: ignore[arg-type]
    callback = LandingCallback()
    callback.num_steps = 5
    restored = LandingCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.num_steps == 5
    restored.load_state_dict({})
    assert restored.num_steps == 0


@pytest.mark.parametrize("manifold", ["stiefel", "sphere"])
def test_method_fragment_parses(manifold: str, tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from app.cli import AppCLI

    cli = AppCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                 subclass_mode_data=True, run=False, args=[
                     "--config", str(ROOT / "configs/data/glue_rte.yaml"),
                     "--config", str(ROOT / f"configs/methods/manifold_{manifold}.yaml"),
                     "--model.init_args.checkpoint", str(tiny_ckpt("bert")),
                     "--data.init_args.data_dir", str(glue_dir),
                     "--trainer.default_root_dir", str(tmp_path)])
    adapter = cli.model.adapter
    assert type(adapter) is ManifoldLoraConfig and adapter.manifold == manifold
    assert adapter.r == 8 and adapter.lora_alpha == 16
    landing = [c for c in cli.trainer.callbacks if isinstance(c, LandingCallback)]
    assert len(landing) == 1 and landing[0].manifold_for(cli.model) == manifold
    assert landing[0].manifold is None  # stated once, on the adapter
    assert any(isinstance(c, OrthogonalityDrift) for c in cli.trainer.callbacks)
