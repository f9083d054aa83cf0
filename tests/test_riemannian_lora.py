"""Riemannian-preconditioned LoRA: the r x r preconditioning against its definition, the
config's checks and plain-LoRA export, and a real run of its fragment whose trajectory differs
from LoRA's."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from test_resume_methods import method_fragment
from tiny import glue_run_config, tiny_config, write_yaml

from app.adapters.peft_family import PeftMethod
from app.adapters.riemannian_lora import (
    RiemannianLoraConfig,
    RiemannianPreconditioner,
    precondition,
)
from app.cli import build_cli
from app.errors import ConfigError


def test_precondition_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 9, generator=gen), torch.randn(3, 7, 4, generator=gen)
    ga, gb = torch.randn(3, 4, 9, generator=gen), torch.randn(3, 7, 4, generator=gen)
    delta = 1e-3
    new_a, new_b = precondition(a, b, ga, gb, delta)
    eye = torch.eye(4, dtype=torch.float64)
    for k in range(3):
        aa, bb = a[k].double(), b[k].double()
        want_a = torch.linalg.inv(bb.T @ bb + delta * eye) @ ga[k].double()
        want_b = gb[k].double() @ torch.linalg.inv(aa @ aa.T + delta * eye)
        torch.testing.assert_close(new_a[k].double(), want_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new_b[k].double(), want_b, rtol=1e-4, atol=1e-5)
    zero_b = torch.zeros_like(b)  # LoRA's init: grad_A is 0, so the first step moves B only
    out_a, _ = precondition(a, zero_b, torch.zeros_like(ga), gb, 1e-6)
    assert torch.count_nonzero(out_a) == 0


def test_sharded_rows_with_one_gram_all_reduce_equal_whole_factors() -> None:
    """FSDP2's layout: B's rows and A's columns split over two ranks; summing the local Gram
    matrices (what the all-reduce does) gives each rank its rows of the whole result."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 8, 3, generator=gen)
    ga, gb = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 8, 3, generator=gen)
    whole_a, whole_b = precondition(a, b, ga, gb, 1e-3)
    halves = [(a[..., :6], b[:, :5], ga[..., :6], gb[:, :5]),
              (a[..., 6:], b[:, 5:], ga[..., 6:], gb[:, 5:])]
    total = sum(torch.cat([bb.transpose(-1, -2) @ bb, aa @ aa.transpose(-1, -2)])
                for aa, bb, _, _ in halves)

    def all_reduce(t: torch.Tensor) -> None:
        t.copy_(total)

    outs = [precondition(*half, 1e-3, all_reduce) for half in halves]
    torch.testing.assert_close(torch.cat([o[0] for o in outs], -1), whole_a)
    torch.testing.assert_close(torch.cat([o[1] for o in outs], -2), whole_b)


def test_config_checks_and_plain_lora_export() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.init_args\.delta must be a finite number"):
        RiemannianLoraConfig(r=4, delta=0.0)
    with pytest.raises(ConfigError, match="use_dora"):
        RiemannianLoraConfig(r=4, use_dora=True)
    config = RiemannianLoraConfig(r=4, delta=1e-4)
    assert "delta" not in config.to_dict() and config.to_dict()["r"] == 4
    assert RiemannianLoraConfig.spec.rank_field == "adapter.r"
    assert "fsdp" not in RiemannianLoraConfig.spec.strategies  # FSDP1 flat shards
    assert "fsdp2" in RiemannianLoraConfig.spec.strategies  # r x r all-reduces on local rows


def test_pre_step_preconditions_every_layer() -> None:
    """The hook the callback attaches rewrites each LoRA layer's gradients as defined."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = RiemannianLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                  delta=1e-2)
    model = PeftMethod(config).apply(
        AutoModelForSequenceClassification.from_config(tiny_config("bert", 120)), ["classifier"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    out = model(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    named = dict(model.named_parameters())
    before = {n: p.grad.clone() for n, p in named.items() if "lora_" in n}
    callback = RiemannianPreconditioner()
    callback.setup(types.SimpleNamespace(strategy=_single(), precision="32-true"),
                   types.SimpleNamespace(adapter=config), "fit")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    callback.on_train_start(types.SimpleNamespace(optimizers=[optimizer]),
                            types.SimpleNamespace(model=model))
    callback._pre_step()
    a_names = [n for n in before if "lora_A" in n]
    assert len(a_names) == 4 and callback.num_steps == 1
    for a_name in a_names:
        b_name = a_name.replace("lora_A", "lora_B")
        a, b = named[a_name].detach(), named[b_name].detach()
        want_a, want_b = precondition(a[None], b[None], before[a_name][None],
                                      before[b_name][None], 1e-2)
        torch.testing.assert_close(named[a_name].grad, want_a[0])
        torch.testing.assert_close(named[b_name].grad, want_b[0])
        assert not torch.allclose(named[b_name].grad, before[b_name])


def _single():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    return SingleDeviceStrategy("cpu")


def _fit(ckpt: Path, glue_dir: Path, root: Path, fragment: Path):
    cfg = glue_run_config(ckpt, glue_dir, root / "runs", max_steps=3, limit_val_batches=0,
                          val_check_interval=None)
    return build_cli(["fit", "--config", str(write_yaml(root / "run.yaml", cfg)),
                      "--config", str(fragment), "--checkpoint.monitor", "null"])


def test_fragment_run_preconditions_every_step_and_differs_from_lora(
        tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_ckpt("bert")
    cli = _fit(ckpt, glue_dir, tmp_path / "r", method_fragment("riemannian_lora", tmp_path))
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RiemannianPreconditioner)]
    assert callback.num_steps == 3 and callback.delta == 1e-6
    lora = _fit(ckpt, glue_dir, tmp_path / "l", method_fragment("lora", tmp_path))
    ours = {n: p for n, p in cli.model.model.named_parameters() if "lora_B" in n}
    theirs = dict(lora.model.model.named_parameters())
    assert ours and all(not torch.allclose(p, theirs[n]) for n, p in ours.items())
    (run,) = (tmp_path / "r/runs/lightning_logs").iterdir()
    saved = json.loads((run / "adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "delta" not in saved
