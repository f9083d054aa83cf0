"""Test-only helpers of the geometry tests (StelLA, Manifold-LoRA, drift monitor).

- :class:`DumpAdapter`: a callback that saves each rank's trainable parameters at the end of
  ``fit``; the DDP tests load it in the real ``lightning-cli`` subprocess (``tests/`` is put on
  ``PYTHONPATH``) and compare the ranks.
- :func:`fit_tiny`: the real ``ClassificationModule`` and ``GLUEDataModule`` on a tiny model
  and the small GLUE files, trained in-process by a plain ``Trainer``.
- :func:`run_cli`: the real command line in a subprocess.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch


class DumpAdapter(L.Callback):
    """Save ``{name: tensor}`` of the trainable parameters to ``dirpath/rank{r}.pt`` at fit end.

    Args:
        dirpath: Output folder (created).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()
                 if p.requires_grad}
        folder = Path(self.dirpath)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "global_step": trainer.global_step,
                    "world_size": trainer.world_size},
                   folder / f"rank{trainer.global_rank}.pt")


def fit_tiny(ckpt: Path, data_dir: Path, root: Path, adapter: Any, callbacks: list,
             *, lr: float = 5e-3, weight_decay: float = 0.01, seed: int = 7,
             optimizer: Any = None, ckpt_path: str | None = None, fit: bool = True,
             **trainer_kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    """Fit ``ClassificationModule`` (RTE, tiny model) with ``adapter`` and ``callbacks``.

    The optimizer is AdamW(lr, weight_decay) unless ``optimizer`` (a factory) is given.
    Validation and logging are off unless ``trainer_kwargs`` turn them on.
    """
    from app.data.glue import GLUEDataModule
    from app.modules.classification import ClassificationModule

    L.seed_everything(seed, verbose=False)
    module = ClassificationModule(
        checkpoint=str(ckpt), task="rte", num_labels=2, adapter=adapter,
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=lr,
                                                 weight_decay=weight_decay))
    data = GLUEDataModule(task="rte", data_dir=str(data_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=str(root), callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    if fit:
        # The checkpoint's hyper-parameters hold the adapter config object, which torch's
        # weights-only unpickler refuses; these are our own checkpoints, so load them fully.
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path,
                    weights_only=False if ckpt_path else None)
    return trainer, module


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lightning-cli ARGS`` with ``tests/`` on ``PYTHONPATH`` (for :class:`DumpAdapter`)."""
    exe = Path(sys.executable).parent / "lightning-cli"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app"]
    from tiny import subprocess_env

    return subprocess.run([*cmd, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
