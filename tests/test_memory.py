"""Measured memory under a real module: optimizer-state bytes against the analytic counts of the
GaLore / GaRare paper, and the MemoryMonitor's logged values read back from the logger.

Analytic counts per adapted / projected weight ``W`` of shape ``p x q`` with ``p <= q`` (the
paper's convention; here taken from the real shapes as ``min`` / ``max``) at rank ``r``, fp32:
AdamW ``2 p q``; LoRA ``2 (p r + q r)`` (moments of A and B); GaLore ``p r`` projector plus
``2 q r`` moments; GaRare ``2 q r``. Every other trainable tensor has AdamW's ``2 numel`` and
every trainable tensor a 4-byte ``step``.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from peft import LoraConfig

from app.callbacks.memory_monitor import MemoryMonitor
from app.data.glue import GLUEDataModule
from app.modules.classification import ClassificationModule
from app.optim.galore import GaLoreAdamW, GaRareAdamW
from app.optim.memory import process_peak_memory_bytes

RANK = 4
TARGETS = ("query", "key", "value", "dense")
F32 = 4


def _optimizer(method: str):
    kw = {"lr": 1e-3, "weight_decay": 0.01}
    if method == "galore":
        return partial(GaLoreAdamW, target_modules=list(TARGETS), rank=RANK, **kw)
    if method == "garare":
        return partial(GaRareAdamW, target_modules=list(TARGETS), rank=RANK, **kw)
    return partial(torch.optim.AdamW, **kw)


def _projected(name: str, param: torch.Tensor) -> bool:
    """Our own reading of the targets: 2-D weights of a module whose name is a target."""
    parts = name.split(".")
    return param.ndim == 2 and parts[-1] == "weight" and parts[-2] in TARGETS


def _expected_state_bytes(method: str, module: ClassificationModule) -> int:
    total = 0
    named = dict(module.model.named_parameters())
    for name, param in named.items():
        if not param.requires_grad:
            continue
        total += F32  # step
        if method == "lora" and "lora_B" in name:
            continue  # counted with its A below
        if method == "lora" and "lora_A" in name:
            a = param
            b = named[name.replace("lora_A", "lora_B")]
            q, r = a.shape[1], a.shape[0]  # A: r x in
            p = b.shape[0]  # B: out x r
            total += F32 * 2 * (p * r + q * r)
        elif method in ("galore", "garare") and _projected(name, param):
            p, q = min(param.shape), max(param.shape)
            total += F32 * (2 * q * RANK + (p * RANK if method == "galore" else 0))
        else:
            total += F32 * 2 * param.numel()
    return total


def _fit(method: str, ckpt: Path, glue_dir: Path, root: Path, **trainer_kw):
    L.seed_everything(0)
    adapter = None
    if method == "lora":
        adapter = LoraConfig(r=RANK, lora_alpha=8, target_modules=["query", "value"])
    module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                  adapter=adapter, optimizer=_optimizer(method))
    data = GLUEDataModule(task="rte", data_dir=str(glue_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)
    monitor = MemoryMonitor()
    logger = CSVLogger(root, name="csv")
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], logger=logger, default_root_dir=root,
                        accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **trainer_kw)
    trainer.fit(module, data)
    return module, trainer, monitor, Path(logger.log_dir) / "metrics.csv"


def _logged(path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


@pytest.mark.parametrize("method", ["adamw", "lora", "galore", "garare"])
def test_state_bytes_equal_analytic_counts_and_are_logged(method: str, tiny_ckpt, glue_dir,
                                                          tmp_path: Path) -> None:
    accumulate = 2 if method == "lora" else 1  # the post-step value waits for a real step
    module, trainer, monitor, csv_path = _fit(method, tiny_ckpt("bert"), glue_dir, tmp_path,
                                              accumulate_grad_batches=accumulate)
    expected = _expected_state_bytes(method, module)
    assert monitor.optimizer_state_bytes == expected
    assert monitor.optimizer_state_bytes_at_start == 0  # Adam state is created lazily
    has_projector = "projector" in monitor.optimizer_state_by_key
    assert has_projector == (method == "galore")
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert monitor.trainable_params == sum(p.numel() for p in trainable)
    assert monitor.total_params == sum(p.numel() for p in module.parameters())
    assert monitor.trainable_param_bytes == F32 * monitor.trainable_params
    assert monitor.peak_source == "rss" and monitor.peak_bytes > 50 * 2**20

    logged = _logged(csv_path)
    assert logged["memory/optimizer_state_bytes"] == [(0, 0.0), (1, float(expected))]
    assert logged["params/trainable"] == [(0, float(monitor.trainable_params))]
    assert logged["params/total"] == [(0, float(monitor.total_params))]
    assert logged["memory/trainable_param_bytes"] == [(0, float(monitor.trainable_param_bytes))]
    assert logged["memory/peak_bytes"] == [(1, float(monitor.peak_bytes))]


def test_garare_state_below_galore_below_adamw(tiny_ckpt, glue_dir, tmp_path: Path) -> None:
    sizes = {m: _fit(m, tiny_ckpt("bert"), glue_dir, tmp_path / m)[2].optimizer_state_bytes
             for m in ("adamw", "galore", "garare")}
    assert sizes["garare"] < sizes["galore"] < sizes["adamw"]
    # the gap GaLore - GaRare is exactly the projectors: r * min(p, q) per projected weight
    module = ClassificationModule(checkpoint=str(tiny_ckpt("bert")), task="rte", num_labels=2)
    module.configure_model()
    projectors = sum(F32 * RANK * min(p.shape) for n, p in module.model.named_parameters()
                     if _projected(n, p))
    assert sizes["galore"] - sizes["garare"] == projectors > 0


def test_peak_memory_device_choice() -> None:
    assert process_peak_memory_bytes("cpu") > 0
    assert process_peak_memory_bytes() > 0
