"""ALLoRA (AlloraConfig + AlloraUpdateScaling): the coefficient on one step, the trajectory
under AdamW against plain LoRA, the YAML fragment, and start-up errors."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tiny import LORA, glue_run_config, write_yaml

from app.adapters.lora import AlloraConfig, lora_layers
from app.callbacks.allora import AlloraUpdateScaling
from app.cli import main
from app.data.glue import GLUEDataModule
from app.errors import ConfigError
from app.modules.classification import ClassificationModule

ROOT = Path(__file__).resolve().parents[1]
ETA = 2.0


def _module(ckpt: Path, adapter=None) -> ClassificationModule:
    adapter = adapter or AlloraConfig(r=4, target_modules=["query", "value"], eta=ETA)
    return ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2, adapter=adapter)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 150, (6, 12), generator=gen)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss


def _coef(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Reference c = 1 / sqrt(||x||^2 + 1/eta^2), in float64."""
    x = x.double()
    sq = x.square().sum() if dim is None else x.square().sum(dim=dim, keepdim=True)
    return 1.0 / torch.sqrt(sq + 1.0 / ETA**2)


def test_config_scaling_one_and_no_dropout() -> None:
    cfg = AlloraConfig(r=16)
    assert cfg.lora_alpha == 16 and cfg.lora_dropout == 0 and cfg.eta == 2.0
    assert AlloraConfig(r=4, lora_alpha=4).lora_alpha == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"lora_dropout": 0.05}, r"lora_dropout=0.05 \(ALLoRA uses no dropout"),
    ({"lora_alpha": 16}, r"lora_alpha=16 with r=8 gives scaling 2"),
    ({"use_rslora": True}, "use_rslora"),
    ({"alpha_pattern": {"query": 4}}, "alpha_pattern"),
    ({"eta": 0.0}, "eta=0.0"),
    ({"eta": float("inf")}, "eta=inf"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AlloraConfig(r=8, **kwargs)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_applied_coefficient_matches_formula_on_one_step(tiny_ckpt, granularity: str) -> None:
    module = _module(tiny_ckpt("bert"))
    module.configure_model()
    model = module.model.eval()  # no dropout: both copies see the same forward
    torch.manual_seed(0)
    with torch.no_grad():  # B away from zero so that A gets a gradient too
        for _, layer, a in lora_layers(model):
            layer.lora_B[a].weight.normal_(std=0.5)
    reference = copy.deepcopy(model)
    factors = {n: p for n, p in model.named_parameters() if "lora_" in n}
    old = {n: p.detach().clone() for n, p in model.named_parameters()}

    kw = {"lr": 0.01, "weight_decay": 0.1}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kw)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], **kw)
    callback = AlloraUpdateScaling(granularity=granularity)
    callback.attach(model, [opt], eta=ETA)
    _loss(model).backward()
    _loss(reference).backward()
    opt.step()
    ref_opt.step()

    proposed = dict(reference.named_parameters())
    assert len(factors) == 8
    for name, param in factors.items():
        if granularity == "tensor":
            dim = None
        else:  # per row of B (norm over its r columns), per column of A (over its r rows)
            dim = 1 if "lora_B" in name else 0
        c = _coef(old[name], dim)
        step = proposed[name].detach().double() - old[name].double()
        assert step.abs().max() > 0, name
        expected = old[name].double() + c * step
        # exact up to fp32 rounding of the two operands (a few ulp of the larger one)
        error = (param.detach().double() - expected).abs()
        bound = 3e-7 * (old[name].double().abs() + (c * step).abs()) + 1e-12
        assert (error <= bound).all(), (name, (error / bound).max().item())
        assert not torch.allclose(param, proposed[name]), name  # the scaling did something
    for name, param in model.named_parameters():  # the head keeps the plain AdamW update
        if param.requires_grad and "lora_" not in name:
            assert torch.equal(param, proposed[name]), name
    assert set(callback.last_coefficient_mean) == {"A", "B"}


def _fit(ckpt: Path, glue_dir: Path, root: Path, callbacks: list, steps: int = 6,
         adapter=None, **trainer) -> tuple[ClassificationModule, L.Trainer]:
    L.seed_everything(3)
    module = _module(ckpt, adapter)
    data = GLUEDataModule(task="rte", data_dir=str(glue_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, default_root_dir=root,
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **trainer)
    trainer.fit(module, data)
    return module, trainer


def test_trajectory_differs_from_lora_under_adamw(tiny_ckpt, glue_dir: Path, tmp_path) -> None:
    ckpt = tiny_ckpt("bert")
    plain, _ = _fit(ckpt, glue_dir, tmp_path / "a", [])  # LoRA, s = 1, no dropout
    again, _ = _fit(ckpt, glue_dir, tmp_path / "b", [])  # same seed: same trajectory
    allora, trainer = _fit(ckpt, glue_dir, tmp_path / "c", [AlloraUpdateScaling()],
                           accumulate_grad_batches=2)
    plain_acc, _ = _fit(ckpt, glue_dir, tmp_path / "d", [], accumulate_grad_batches=2)
    assert trainer.global_step == 6
    p_plain = dict(plain.model.named_parameters())
    p_again = dict(again.model.named_parameters())
    p_acc = dict(plain_acc.model.named_parameters())
    differs = 0
    for name, param in allora.model.named_parameters():
        if "lora_B" in name:
            assert torch.equal(p_plain[name], p_again[name])
            assert param.abs().sum() > 0
            rel = (param - p_acc[name]).norm() / p_acc[name].norm()
            differs += bool(rel > 0.05)
    assert differs == 4  # every B moved differently from plain LoRA under AdamW


def test_yaml_fragment_through_cli(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    method = yaml.safe_load((ROOT / "configs/methods/allora.yaml").read_text())
    adapter = method["model"]["init_args"]["adapter"]
    adapter["init_args"].update(r=4, target_modules=["query", "value"])
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", adapter=adapter,
                          max_steps=3)
    cfg["trainer"]["callbacks"] = method["trainer"]["callbacks"]
    cfg["trainer"]["val_check_interval"] = 3
    main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg))])
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    values = [e.value for e in acc.Scalars("allora/coef_B_mean")]
    assert len(values) == 3
    assert values[0] == pytest.approx(ETA)  # B = 0: c = eta exactly on the first step
    assert all(0 < v <= ETA for v in values)


def _cli_error(cfg: dict, tmp_path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg))])
    assert exc.value.code == 2
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # nothing trained
    return capsys.readouterr().err


@pytest.mark.parametrize("override, match", [
    ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
    ({"lora_alpha": 16}, "gives scaling 4"),
])
def test_cli_refuses_dropout_or_scaling(override: dict, match: str, tiny_ckpt, glue_dir,
                                        tmp_path, capsys) -> None:
    adapter = {"class_path": "app.adapters.lora.AlloraConfig",
               "init_args": {"r": 4, "target_modules": ["query"], **override}}
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", adapter=adapter)
    err = _cli_error(cfg, tmp_path, capsys)
    assert "error: ALLoRA (model.init_args.adapter.init_args)" in err and match in err


def test_callback_refuses_plain_lora_at_startup(tiny_ckpt, glue_dir, tmp_path, capsys) -> None:
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", adapter=LORA)
    cfg["trainer"]["callbacks"] = [{"class_path": "app.callbacks.allora.AlloraUpdateScaling"}]
    err = _cli_error(cfg, tmp_path, capsys)
    assert "AlloraUpdateScaling needs model.init_args.adapter to be" in err
    assert "got LoraConfig" in err


def test_layer_checks_and_eta_conflict(tiny_ckpt, glue_dir, tmp_path) -> None:
    module = _module(tiny_ckpt("bert"))
    module.configure_model()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    _, layer, name = next(lora_layers(module.model))
    layer.scaling[name] = 2.0  # e.g. changed after the config was checked
    with pytest.raises(ConfigError, match="has scaling 2 and dropout 0; ALLoRA needs"):
        AlloraUpdateScaling().attach(module.model, [opt], eta=ETA)
    with pytest.raises(ConfigError, match="eta=1.0 differs from the adapter's eta=2.0"):
        _fit(tiny_ckpt("bert"), glue_dir, tmp_path, [AlloraUpdateScaling(eta=1.0)])
    with pytest.raises(ConfigError, match="granularity"):
        AlloraUpdateScaling(granularity="column")  # type: ignore[arg-type]
