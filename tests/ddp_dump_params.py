"""Test-only callback: each rank saves its parameters at the end of ``fit``.

Used by the multi-process tests, which run the real CLI in a subprocess with ``tests/`` on
``PYTHONPATH`` (``class_path: ddp_dump_params.DumpParams``) and compare the ranks' files.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class DumpParams(L.Callback):
    """Write ``rank<global_rank>.pt``: ``{"params": {name: tensor}, "trainable": [names]}``.

    Args:
        dirpath: Folder for the files (created).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.dirpath)
        folder.mkdir(parents=True, exist_ok=True)
        named = list(pl_module.named_parameters())
        torch.save({"params": {n: p.detach().cpu().clone() for n, p in named},
                    "trainable": [n for n, p in named if p.requires_grad],
                    "global_step": trainer.global_step,
                    "world_size": trainer.world_size},
                   folder / f"rank{trainer.global_rank}.pt")


def run_cli_ddp(config: Path, cwd: Path, devices: int = 2, timeout: int = 300):
    """Run ``lightning-cli fit --config CONFIG`` as a CPU DDP job with ``devices`` processes.

    ``tests/`` goes on ``PYTHONPATH`` so the subprocess (and DDP's re-launched ranks) can import
    this module's callback. Returns the ``subprocess.CompletedProcess``.
    """
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "lightning-cli"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app"]
    from tiny import subprocess_env

    env = subprocess_env()
    return subprocess.run(
        [*cmd, "fit", "--config", str(config), "--trainer.strategy", "ddp",
         "--trainer.devices", str(devices), "--trainer.accelerator", "cpu"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
