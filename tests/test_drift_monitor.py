"""The orthogonality-drift monitor: factor discovery, measured values, threshold stop."""

from __future__ import annotations

import types
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_dump import fit_tiny

from app.adapters.manifold_lora import ManifoldLoraConfig
from app.adapters.stella import StellaConfig
from app.callbacks.drift_monitor import OrthogonalityDrift
from app.callbacks.landing import LandingCallback
from app.callbacks.stella import StellaCallback
from app.errors import ConfigError
from app.manifolds import stiefel


class _Provider:
    """A minimal object following the ``constrained_factors`` protocol."""

    def __init__(self, factors: list[tuple[str, torch.Tensor, str]]) -> None:
        self.factors = factors

    def constrained_factors(self, pl_module: object) -> list[tuple[str, torch.Tensor, str]]:
        return self.factors


def test_measure_values_and_discovery_without_order() -> None:
    gen = torch.Generator().manual_seed(0)
    x = stiefel.random_orthonormal(12, 3, gen)
    bent = x.clone()
    bent[:, 0] *= 1.1  # Stiefel drift ||X^T X - I||_F = 1.21 - 1 = 0.21
    sphere_x = torch.randn(9, 3, generator=gen)
    sphere_x = sphere_x / sphere_x.norm(dim=0)
    sphere_x[:, 1] *= 2.0  # column-norm deviation |4 - 1| = 3
    monitor = OrthogonalityDrift(patterns=["extra"])
    module = torch.nn.Module()
    module.extra = torch.nn.Parameter(x.T.clone())  # wide: the monitor takes the tall form
    trainer = types.SimpleNamespace(callbacks=[
        monitor,
        _Provider([("ok", x, "stiefel"), ("bent", bent, "stiefel")]),
        _Provider([("ball", sphere_x, "sphere")]),
    ])
    drifts = monitor.measure(trainer, module)
    assert set(drifts) == {"ok", "bent", "ball", "extra"}
    assert drifts["ok"] < 1e-6 and drifts["extra"] < 1e-6
    assert drifts["bent"] == pytest.approx(0.21, rel=1e-4)
    assert drifts["ball"] == pytest.approx(3.0, rel=1e-5)


def test_threshold_stops_training_naming_the_layer(tiny_ckpt, glue_dir: Path,
                                                   tmp_path: Path) -> None:
    monitor = OrthogonalityDrift(every_n_steps=2, threshold=1e-12)
    adapter = ManifoldLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    with pytest.warns(UserWarning, match=r"OrthogonalityDrift: drift .* of model\.base_model\."
                                         r"model\.bert\.encoder\.layer\.\d\.attention\.self\."
                                         r"(query|value)\.lora_B\.default\.weight exceeds "
                                         r"threshold=1e-12 at step 2"):
        trainer, _ = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, adapter,
                              [monitor, LandingCallback()], max_steps=20)
    assert trainer.global_step == 2 and trainer.should_stop
    assert monitor.stop_message is not None and monitor.last["worst"] in monitor.stop_message
    assert monitor.last["max"] > 1e-12


def test_no_constrained_factor_is_a_startup_error(tiny_ckpt, glue_dir: Path,
                                                  tmp_path: Path) -> None:
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="OrthogonalityDrift found no constrained factor"):
        fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, LoraConfig(r=4),
                 [OrthogonalityDrift()], max_steps=2)
    # With a pattern any adapter can be watched (here plain LoRA's A, as tall A^T).
    monitor = OrthogonalityDrift(every_n_steps=1, patterns=["lora_A"])
    fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path, LoraConfig(r=4), [monitor], max_steps=2)
    assert monitor.last["step"] == 2 and "lora_A" in monitor.last["worst"]


def test_logs_stella_drift_every_n_steps(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    logged: list[tuple[int, float]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            value = trainer.callback_metrics.get("manifold/drift_max")  # runs after monitor
            if value is not None and trainer.global_step % 3 == 0:
                logged.append((trainer.global_step, float(value)))

    monitor = OrthogonalityDrift(every_n_steps=3)
    trainer, module = fit_tiny(tiny_ckpt("bert"), glue_dir, tmp_path,
                               StellaConfig(r=4, alpha=8.0), [StellaCallback(), monitor, Spy()],
                               max_steps=9)
    assert [s for s, _ in logged] == [3, 6, 9]
    assert all(0 < v < 1e-5 for _, v in logged)
    assert trainer.callback_metrics["manifold/drift_mean"] <= trainer.callback_metrics[
        "manifold/drift_max"]
    assert logged[-1][1] == pytest.approx(max(monitor.measure(trainer, module).values()))


def test_options_and_state_dict() -> None:
    with pytest.raises(ConfigError, match="every_n_steps"):
        OrthogonalityDrift(every_n_steps=0)
    with pytest.raises(ConfigError, match="threshold"):
        OrthogonalityDrift(threshold=-1.0)
    monitor = OrthogonalityDrift()
    monitor.last, monitor._last_step = {"step": 50, "max": 1e-4, "mean": 5e-5, "worst": "b"}, 50
    restored = OrthogonalityDrift()
    restored.load_state_dict(monitor.state_dict())
    assert restored.last == monitor.last and restored._last_step == 50
    restored.load_state_dict({})
    assert restored.last == {} and restored._last_step == -1
