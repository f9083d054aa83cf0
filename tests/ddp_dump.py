"""Test-only helpers for the multi-process and start-up tests.

- :class:`DumpParams`: a callback that saves each rank's parameters at the end of ``fit``; the
  DDP tests load it in the real ``lightning-cli`` subprocess (``tests/`` is put on
  ``PYTHONPATH``, ``class_path: ddp_dump.DumpParams``) and compare the ranks.
- :func:`run_cli`: the real command line in a subprocess.
- :func:`run_two_ranks`: a fit config run as a two-process CPU DDP job; returns both ranks'
  dumps after checking they hold identical parameters.
- :func:`fit_tiny`: the real ``ClassificationModule`` and ``GLUEDataModule`` on a tiny model
  and the small GLUE files, trained in-process by a plain ``Trainer``.
- :func:`fails_before_training`: a start-up check refuses before the first step.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch


class DumpParams(L.Callback):
    """Write ``rank<global_rank>.pt``: ``{"params": {name: tensor}, "trainable": [names],
    "global_step", "world_size"}`` at the end of ``fit``.

    Args:
        dirpath: Output folder (created).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.dirpath)
        folder.mkdir(parents=True, exist_ok=True)
        from torch.distributed.tensor import DTensor

        named = list(pl_module.named_parameters())
        # FSDP2: DTensor shards, gathered to whole tensors (a collective: every rank dumps)
        whole = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                 for n, p in named}
        torch.save({"params": whole,
                    "trainable": [n for n, p in named if p.requires_grad],
                    "sharded": [n for n, p in named if isinstance(p, DTensor)],
                    "global_step": trainer.global_step,
                    "world_size": trainer.world_size},
                   folder / f"rank{trainer.global_rank}.pt")


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lightning-cli ARGS`` with ``tests/`` on ``PYTHONPATH`` (for :class:`DumpParams`), a
    clean distributed environment and a free ``MASTER_PORT``."""
    exe = Path(sys.executable).parent / "lightning-cli"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app"]
    from tiny import subprocess_env

    return subprocess.run([*cmd, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_two_ranks(config: dict, root: Path, steps: int, *extra: str,
                  strategy: str = "ddp") -> tuple[dict, dict, subprocess.CompletedProcess]:
    """Fit ``config`` as a two-process CPU job and return ``(rank0, rank1, process)``.

    Adds :class:`DumpParams` to the callbacks, writes ``root/run.yaml`` and checks that the run
    succeeded, both ranks made ``steps`` optimizer steps in a world of 2, and every parameter
    is identical on the two ranks.
    """
    from tiny import write_yaml

    config.setdefault("trainer", {}).setdefault("callbacks", [])
    config["trainer"]["callbacks"].append({"class_path": "ddp_dump.DumpParams",
                                           "init_args": {"dirpath": str(root / "dump")}})
    path = write_yaml(root / "run.yaml", config)
    proc = run_cli("fit", "--config", str(path), "--trainer.strategy", strategy,
                   "--trainer.devices", "2", "--trainer.accelerator", "cpu", *extra,
                   cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(root / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == steps
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    return rank0, rank1, proc


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


def fails_before_training(ckpt: Path, glue_dir: Path, tmp_path: Path, adapter: Any,
                          callbacks: list, match: str, **trainer_kwargs: Any) -> None:
    """``fit`` raises ``ConfigError`` matching ``match`` before the first optimizer step."""
    from app.data.glue import GLUEDataModule
    from app.errors import ConfigError

    trainer, module = fit_tiny(ckpt, glue_dir, tmp_path, adapter, callbacks, max_steps=2,
                               fit=False, **trainer_kwargs)
    data = GLUEDataModule(task="rte", data_dir=str(glue_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)
    with pytest.raises(ConfigError, match=match):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
