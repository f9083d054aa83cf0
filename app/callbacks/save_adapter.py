"""Write the trained adapter in PEFT format at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info


class SaveAdapter(L.Callback):
    """At the end of ``fit``, save the adapter (PEFT format) to the run folder.

    The adapter holds the weights at the end of training; to export another checkpoint
    (for example the best one) use ``python -m app.export``.

    Args:
        dirname: Folder name inside the run folder (``trainer.log_dir``), or an absolute path.
        enabled: Set ``false`` to skip the export.
    """

    def __init__(self, dirname: str = "adapter", enabled: bool = True) -> None:
        self.dirname = dirname
        self.enabled = enabled
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        if trainer.interrupted or trainer.received_sigterm:  # stopped early: not a result
            return
        root = Path(trainer.log_dir or trainer.default_root_dir)
        target = Path(self.dirname) if Path(self.dirname).is_absolute() else root / self.dirname
        self.path = target
        gather = getattr(trainer.strategy, "full_state_dict", None)  # FSDP2 (app.fsdp2)
        if isinstance(trainer.strategy, FSDPStrategy) or callable(gather):
            # Shards only: gather on every rank (a collective), export on rank 0.
            state = (gather() if callable(gather)
                     else trainer.strategy.lightning_module_state_dict())
            if trainer.is_global_zero:
                pl_module.save_adapter_from_state_dict(target, state)
                rank_zero_info(f"adapter saved to {target}")
        elif trainer.is_global_zero:
            pl_module.save_adapter(target)
            rank_zero_info(f"adapter saved to {target}")
        trainer.strategy.barrier("save_adapter")
