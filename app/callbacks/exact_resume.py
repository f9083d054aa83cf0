"""Make ``--ckpt_path`` resume continue with the next unseen batch, whatever built the loader.

Lightning builds the training loader once per fit and applies the loader positions saved in
a checkpoint (``ResumableDataLoader.load_state_dict``) only when it builds it in
``FitLoop.setup_data`` *after* the loops were restored. Anything that asks for
``trainer.estimated_stepping_batches`` during ``configure_optimizers`` (every schedule in this
project does, to know its length) builds the loader earlier, while the strategy is set up and
before the checkpoint's loop state is read; the second ``setup_data`` then returns early and
the saved position is silently dropped, so a mid-epoch resume replays the epoch from its first
batch (Lightning issue #20550). With a fixed ``max_steps`` and no ``max_epochs`` Lightning
answers ``estimated_stepping_batches`` without building the loader, which is why a resume test
without ``max_epochs`` passes while a data fragment's ``max_epochs: 10`` exposes the bug.

:class:`ExactResume` drops such an early loader at ``on_fit_start`` of a resumed ``fit``
(after the strategy set-up, before the loop state is restored), so that Lightning's own path
builds it again after the restore and applies the saved position. Nothing else changes: the
loader's length, hence ``estimated_stepping_batches``, is the same.
"""

from __future__ import annotations

import lightning as L


class ExactResume(L.Callback):
    """Rebuild a training loader that was built before the checkpoint's loop state was read.

    The CLI adds it to every run (``trainer_defaults``); it does nothing on a fresh ``fit``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        drop_early_train_loader(trainer)


def drop_early_train_loader(trainer: L.Trainer) -> bool:
    """Forget a training loader built before the restore; ``True`` if there was one.

    ``FitLoop.setup_data`` builds a loader only when it holds none, and applies the pending
    checkpoint positions right after building it.
    """
    fit_loop = trainer.fit_loop
    if getattr(fit_loop, "_combined_loader", None) is None:
        return False
    if fit_loop._data_fetcher is not None:
        fit_loop._data_fetcher.teardown()  # stops the early loader's workers, if any
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None
    return True
