"""Full fine-tuning and the PEFT variants through the CLI: what each one trains, saves, exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import glue_run_config, write_yaml

from app.cli import build_cli
from app.export import export_adapter, export_merged


def fit(tmp_path: Path, ckpt: Path, glue_dir: Path, adapter: dict | None, *extra: str):
    cfg = write_yaml(tmp_path / "run.yaml",
                     glue_run_config(ckpt, glue_dir, tmp_path / "runs", adapter=adapter,
                                     max_steps=4))
    cli = build_cli(["fit", "--config", str(cfg), *extra])
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    return cli, run


def lora(**kwargs) -> dict:
    return {"class_path": "peft.LoraConfig",
            "init_args": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **kwargs}}


BATCH = {"input_ids": torch.randint(5, 100, (3, 12)),
         "attention_mask": torch.ones(3, 12, dtype=torch.long)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**BATCH).logits


def test_full_finetuning(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    cli, run = fit(tmp_path, tiny_ckpt("bert"), glue_dir, None)
    model = cli.model.model
    assert all(p.requires_grad for p in model.parameters())
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert len(state) == len(list(model.parameters()))  # everything is trainable, all saved
    exported = AutoModelForSequenceClassification.from_pretrained(run / "adapter")
    torch.testing.assert_close(logits(exported), logits(model))


def test_lora_checkpoint_excludes_frozen_base(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    cli, run = fit(tmp_path, tiny_ckpt("bert"), glue_dir, lora())
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    trainable = {f"model.{n}" for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    n_saved = sum(v.numel() for v in state.values())
    n_total = sum(p.numel() for p in cli.model.model.parameters())
    assert n_saved < 0.2 * n_total


def test_rslora_scaling(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    cli, _ = fit(tmp_path, tiny_ckpt("bert"), glue_dir, lora(use_rslora=True))
    from peft.tuners.lora import LoraLayer

    layers = [m for m in cli.model.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == pytest.approx(8 / 4**0.5) for m in layers)


def test_dora_trains_magnitude(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    cli, run = fit(tmp_path, tiny_ckpt("bert"), glue_dir, lora(use_dora=True))
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert any("lora_magnitude_vector" in k for k in state)


def test_pissa_export_is_plain_lora_on_original_base(tiny_ckpt, glue_dir: Path,
                                                     tmp_path: Path) -> None:
    """PiSSA changes the frozen base; the export is converted so the ORIGINAL base plus the
    adapter gives the trained model's outputs."""
    import json

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ckpt = tiny_ckpt("bert")
    cli, run = fit(tmp_path, ckpt, glue_dir, lora(init_lora_weights="pissa"))
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8  # PEFT's conversion doubles the rank
    base = AutoModelForSequenceClassification.from_pretrained(
        ckpt, config=AutoConfig.from_pretrained(adapter))
    loaded = PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(logits(loaded), logits(cli.model.model), atol=1e-5, rtol=1e-4)


def test_loraplus_learning_rates(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    plus = {**lora(loraplus_lr_ratio=16), "class_path": "app.adapters.loraplus.LoraPlusConfig"}
    cli, _ = fit(tmp_path, tiny_ckpt("bert"), glue_dir, plus)
    optimizer = cli.trainer.optimizers[0]
    ids = {id(p): n for n, p in cli.model.model.named_parameters()}
    lrs: dict[str, set[float]] = {"A": set(), "B": set()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = ids[id(p)]
            if "lora_A" in name:
                lrs["A"].add(group["initial_lr"])
            elif "lora_B" in name:
                lrs["B"].add(group["initial_lr"])
    assert lrs["A"] == {5e-3} and lrs["B"] == {5e-3 * 16}


def test_export_commands(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """Adapter from the best checkpoint, then a merged model with the same logits."""
    from transformers import AutoModelForSequenceClassification

    cli, run = fit(tmp_path, tiny_ckpt("roberta"), glue_dir, lora())
    expected = logits(cli.model.model)
    adapter = export_adapter(run / "checkpoints/last.ckpt", tmp_path / "exported")
    merged = export_merged(adapter, tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    assert (merged / "tokenizer.json").is_file()
