"""``configs/strategy/bf16.yaml`` with every method on a bf16-saved tiny BERT (hub models are
saved in bf16 and transformers loads them so): bf16 compute, fp32 master weights and fp32
optimizer state, the frozen base kept bf16, and each method's constraint still holds after a
few steps. The same policy on a bf16-saved tiny Llama, with the export, is in
``test_precision.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_resume_methods import METHODS, method_fragment
from tiny import glue_run_config, write_yaml

from app.callbacks.factors import tall
from app.cli import build_cli
from app.manifolds import sphere, stiefel

ROOT = Path(__file__).resolve().parents[1]


class ComputeDtype(L.Callback):
    """Records the output dtype of every ``nn.Linear`` during training steps."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self._handles: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:
                self.dtypes.add(output.dtype)

        self._handles = [m.register_forward_hook(record) for m in pl_module.modules()
                         if isinstance(m, torch.nn.Linear)]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()


def _fit(name: str, ckpt: Path, glue_dir: Path, tmp_path: Path):
    cfg = glue_run_config(ckpt, glue_dir, tmp_path / "runs", max_steps=3, limit_val_batches=0,
                          val_check_interval=None)
    return build_cli([
        "fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg)),
        "--config", str(method_fragment(name, tmp_path)),
        "--trainer.callbacks+=test_bf16.ComputeDtype",  # after the fragment's own list
        "--config", str(ROOT / "configs/strategy/bf16.yaml"),
        "--checkpoint.monitor", "null", "--save_adapter.enabled", "false"])


def _callback(cli, cls_name: str) -> Any:
    (found,) = [c for c in cli.trainer.callbacks if type(c).__name__ == cls_name]
    return found


def _check_constraint(cli) -> None:
    """Each method's declared invariants still hold (read from its declaration, never its
    name): constrained factors on their manifold, its callbacks stepped, its optimizer's rank."""
    method = cli.model.method
    spec, constraint = method.spec, method.constraint()
    named = dict(cli.model.model.named_parameters())
    optimizer = cli.trainer.optimizers[0]
    callbacks = {f"{type(c).__module__}.{type(c).__qualname__}": c for c in cli.trainer.callbacks}
    if constraint is not None:
        factors = [p for n, p in named.items() if any(f in n for f in constraint.factors)]
        assert len(factors) == 4 * len(constraint.factors)  # query and value of 2 layers
        drift = stiefel.drift if constraint.manifold == "stiefel" else sphere.drift
        tolerance = 1e-5 if constraint.exact else 1e-3  # retraction / frozen vs landing
        assert max(float(drift(tall(p.detach()))) for p in factors) < tolerance
        if constraint.callback is None:  # held on the manifold by not training it
            assert not any(p.requires_grad for p in factors)
    needed = set(spec.callbacks) | {constraint.callback} if constraint else set(spec.callbacks)
    for path in needed - {None}:
        callback = callbacks[path]
        assert callback.num_steps == 3
        coefficients = getattr(callback, "last_coefficient_mean", None)
        if coefficients is not None:  # an update scaling touches both LoRA factors
            assert set(coefficients) == {"A", "B"}
    ratio = getattr(cli.model.adapter, "loraplus_lr_ratio", None)
    if ratio is not None:
        base = optimizer.param_groups[0]["initial_lr"]  # the schedule has decayed lr to 0
        lrs = {round(g["initial_lr"] / base, 6) for g in optimizer.param_groups if g["params"]}
        assert ratio in lrs  # B learns loraplus_lr_ratio times faster
    if spec.rank_field == "optimizer.rank":
        projected = [(p, optimizer.state[p], g["rank"]) for g in optimizer.param_groups
                     for p, flag in zip(g["params"], g["projected"]) if flag]
        assert projected
        for p, state, rank in projected:
            assert rank in state["exp_avg"].shape and state["exp_avg"].numel() < p.numel()
            assert ("projector" in state) == (type(optimizer).projection == "svd")


@pytest.mark.parametrize("name", METHODS)
def test_bf16_mixed_keeps_fp32_masters_and_constraints(name: str, tiny_ckpt, glue_dir: Path,
                                                       tmp_path: Path) -> None:
    cli = _fit(name, tiny_ckpt("bert", torch.bfloat16), glue_dir, tmp_path)
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 3
    assert torch.bfloat16 in _callback(cli, "ComputeDtype").dtypes  # compute really is bf16
    trainable = {n: p for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert trainable
    bad = {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32}
    assert not bad, f"trainable parameters not fp32: {bad}"
    kept = cli.model.trainable_state_keys  # trained + frozen adapter tensors (checkpointed)
    base = {n: p.dtype for n, p in cli.model.model.named_parameters()
            if not p.requires_grad and f"model.{n}" not in kept}
    assert cli.model.adapter is None or base, "an adapter run has a frozen base"
    assert set(base.values()) <= {torch.bfloat16}, base  # the checkpoint's dtype (auto)
    optimizer = cli.trainer.optimizers[0]
    states = [(k, v) for s in optimizer.state.values() for k, v in s.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert states and all(v.dtype == torch.float32 for _, v in states), \
        {k: v.dtype for k, v in states}
    _check_constraint(cli)
