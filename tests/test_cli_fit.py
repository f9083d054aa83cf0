"""End to end through the installed ``lightning-cli`` entry point with YAML, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import LORA, glue_run_config, write_yaml

from app.modules.classification import ClassificationModule

BIN = Path(sys.executable).parent / "lightning-cli"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "app"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def event_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta"])
def test_fit_lora_through_cli(arch: str, tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ckpt = tiny_ckpt(arch)
    cfg = write_yaml(tmp_path / "run.yaml", glue_run_config(ckpt, glue_dir, tmp_path / "runs",
                                                            adapter=LORA))
    proc = run_cli("fit", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters: trainable" in proc.stdout + proc.stderr
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    assert {"train/loss", "train/lr", "val/score", "val/accuracy"} <= event_tags(run)

    # The checkpoint holds the adapter and the head only, never the frozen base.
    last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    keys = list(last["state_dict"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys), keys[:5]
    assert last["optimizer_states"] and last["lr_schedulers"]
    assert last["global_step"] == 6

    # The saved PEFT adapter reproduces the trained module's logits.
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(
        ckpt, config=AutoConfig.from_pretrained(adapter))
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    from peft import LoraConfig

    module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                  adapter=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    module.configure_model()
    module.load_state_dict(last["state_dict"], strict=False)
    module.eval()
    batch = {"input_ids": torch.randint(5, 100, (3, 12)),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        expected = module.model(**batch).logits
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected)
    # and the trained adapter is not the initial one (B moved away from zero)
    assert any(v.abs().sum() > 0 for k, v in last["state_dict"].items() if "lora_B" in k)


def test_python_m_app_validate(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """``python -m app`` is the same CLI; ``validate`` runs and logs validation metrics."""
    cfg = write_yaml(tmp_path / "run.yaml", glue_run_config(tiny_ckpt("bert"), glue_dir,
                                                            tmp_path / "runs", task="stsb"))
    proc = subprocess.run([sys.executable, "-m", "app", "validate", "--config", str(cfg)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/pearson" in proc.stdout and "val/spearman" in proc.stdout


def test_test_and_predict_from_checkpoint(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """``test`` and ``predict`` restore a fit checkpoint and use the trained weights."""
    from app.cli import build_cli

    cfg = write_yaml(tmp_path / "run.yaml", glue_run_config(tiny_ckpt("bert"), glue_dir,
                                                            tmp_path / "runs", adapter=LORA))
    fitted = build_cli(["fit", "--config", str(cfg)])
    last = Path(fitted.trainer.checkpoint_callback.last_model_path)
    val_acc = float(fitted.trainer.callback_metrics["val/accuracy"])

    tested = build_cli(["test", "--config", str(cfg), "--ckpt_path", str(last)])
    metrics = tested.trainer.callback_metrics
    assert {"test/accuracy", "test/score"} <= set(metrics)
    assert float(metrics["test/accuracy"]) == pytest.approx(val_acc)  # same dev set, same weights

    predicted = build_cli(["predict", "--config", str(cfg), "--ckpt_path", str(last)])
    outputs = predicted.trainer.predict_loop.predictions
    preds = torch.cat([o["predictions"] for o in outputs])
    labels = torch.cat([o["labels"] for o in outputs])
    assert preds.shape == labels.shape == (16,)
    assert (preds == labels).float().mean().item() == pytest.approx(val_acc)


def test_tokenised_cache_is_reused(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    from app.data.glue import GLUEDataModule

    dm = GLUEDataModule("mrpc", data_dir=str(glue_dir), checkpoint=str(tiny_ckpt("bert")),
                        max_length=32, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    stamp = dm.cache_path.stat().st_mtime_ns
    again = GLUEDataModule("mrpc", data_dir=str(glue_dir), checkpoint=str(tiny_ckpt("bert")),
                           max_length=32, cache_dir=str(tmp_path / "cache"))
    assert again.cache_path == dm.cache_path
    again.prepare_data()
    assert dm.cache_path.stat().st_mtime_ns == stamp  # not rebuilt
    other = GLUEDataModule("mrpc", data_dir=str(glue_dir), checkpoint=str(tiny_ckpt("bert")),
                           max_length=24, cache_dir=str(tmp_path / "cache"))
    assert other.cache_path != dm.cache_path  # settings are part of the key
    again.setup("fit")
    batch = next(iter(again.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 32
