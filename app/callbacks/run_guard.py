"""Stop bad runs cleanly: a non-finite loss, Ctrl-C and SIGTERM.

- A non-finite training loss stops the run before its backward pass (so the weights of the
  last completed step are intact) with a message naming the step and the last good
  checkpoint. All data-parallel ranks agree on the decision, so none is left waiting.
- The first Ctrl-C (SIGINT) is turned into Lightning's SIGTERM flag, so both signals stop the
  run at the next batch boundary, never in the middle of an optimizer step; a second Ctrl-C
  interrupts at once. At that boundary a resumable ``last.ckpt`` is written (under a
  temporary name, then renamed) and the end-of-fit adapter export is skipped, so nothing
  half-written looks like a result.
- A run stopped that way exits with the shell's convention for a signal, ``128 + signal``:
  **143** after SIGTERM, **130** after Ctrl-C, so schedulers and scripts see that it did not
  finish (the ``SIGTERMException`` Lightning raises is a ``SystemExit`` whose code is set here;
  ``app.cli.main`` makes sure it is never 0).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from app.errors import ConfigError, RunError


class RunGuard(L.Callback):
    """Non-finite loss check and graceful interruption.

    Args:
        check_finite_loss: Stop at the first non-finite training loss.
        save_on_interrupt: Write ``last.ckpt`` when stopped by Ctrl-C or SIGTERM.
    """

    def __init__(self, check_finite_loss: bool = True, save_on_interrupt: bool = True) -> None:
        self.check_finite_loss = check_finite_loss
        self.save_on_interrupt = save_on_interrupt
        self._previous_sigint: Any = None
        self.interrupt_checkpoint: Path | None = None
        self.stop_signal: int = int(signal.SIGTERM)
        self._requested: int | None = None

    # -- non-finite loss ------------------------------------------------------------------
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        if not self.check_finite_loss:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise RunError(
                f"non-finite training loss ({loss.detach().float().item()}) at step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); this step was not "
                f"applied. Last good checkpoint: {last_good_checkpoint(trainer) or 'none yet'}. "
                "Resume from it with --ckpt_path and a lower learning rate "
                "(model.init_args.optimizer.init_args.lr) or gradient clipping "
                "(trainer.gradient_clip_val)"
            )

    # -- interruption ---------------------------------------------------------------------
    # A signal only records a request (no collective, no Lightning state: a handler runs at an
    # arbitrary point of the main thread, possibly between two collectives). The ranks agree
    # on it at each training-batch end, and only then is Lightning's stop flag set, on every
    # rank at once, so all of them stop after the same step and write the same checkpoint.
    # (Lightning's own SIGTERM handler broadcasts from inside the handler and its loops read
    # the flag rank by rank, which left two-process DDP runs waiting on each other.)
    # A stop at an epoch's last batch is put off by one batch: Lightning would write the
    # checkpoint after the epoch's end, a state its restart misreads (it runs an empty epoch
    # and trains the next one on the order of the epoch after). A stop during a validation
    # follows Lightning: it stops after that validation batch and the resume repeats it.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_start: Lightning saves (and at teardown restores) the signal handlers
        # after on_fit_start, so ours must come later to be undone
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        self._requested = None

        def first_ctrl_c(signum: int, frame: Any) -> None:
            self._request(int(signal.SIGINT), "Ctrl-C: stopping at the end of this batch "
                                              "(press again to abort)")
            signal.signal(signal.SIGINT, previous)

        def on_sigterm(signum: int, frame: Any) -> None:
            self._request(int(signal.SIGTERM), "SIGTERM: stopping at the end of this batch")

        self._previous_sigint = previous
        signal.signal(signal.SIGINT, first_ctrl_c)
        signal.signal(signal.SIGTERM, on_sigterm)

    def _request(self, signum: int, message: str) -> None:
        if self._requested is None:
            self._requested = signum
            rank_zero_info(message)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        requested = self._requested is not None
        if trainer.world_size > 1:  # every rank ends every batch: the same collective order
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or _last_of_several(trainer, batch_idx):
            return
        self.stop_signal = self._requested or self.stop_signal
        trainer._signal_connector.received_sigterm = True

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and (
                threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, ConfigError) and trainer.global_step == 0:
            remove_failed_start(trainer)
        if isinstance(exception, SIGTERMException):
            exception.code = exit_status(self.stop_signal)
        if not (self.save_on_interrupt and isinstance(exception, SIGTERMException)):
            return
        if trainer.state.fn != "fit":
            return
        target = interrupt_checkpoint_path(trainer)
        tmp = target.with_name(f".{target.name}.tmp")
        trainer.save_checkpoint(tmp)  # collective under DDP: every rank calls it
        if trainer.is_global_zero:
            os.replace(tmp, target)
        self.interrupt_checkpoint = target
        rank_zero_info(f"interrupted at step {trainer.global_step}: resumable checkpoint "
                       f"{target} (resume with --ckpt_path {target})")


def _last_of_several(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of an epoch of more than one."""
    batches = trainer.num_training_batches
    return isinstance(batches, int) and batches > 1 and batch_idx + 1 >= batches


#: What a start that failed leaves in the logger's version folder (nothing of value).
_START_ARTIFACTS = ("events.out.tfevents.*", "hparams.yaml", "config.yaml")


def remove_failed_start(trainer: L.Trainer) -> None:
    """Remove the run folder a start refused by a :class:`ConfigError` created (event file,
    ``hparams.yaml``, ``config.yaml``), so nothing left behind looks like a run. A folder
    holding anything else (a checkpoint, a user's file) is left alone."""
    if not trainer.is_global_zero or trainer.logger is None:
        return
    folder = Path(trainer.logger.log_dir or "")
    if not folder.is_dir() or folder == Path(trainer.default_root_dir):
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(not any(p.match(pattern) for pattern in _START_ARTIFACTS) for p in files):
        return
    for path in files:
        path.unlink(missing_ok=True)
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    folder.rmdir()
    if not any(folder.parent.iterdir()) and folder.parent != Path(trainer.default_root_dir):
        folder.parent.rmdir()  # lightning_logs/ when this was its only run


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: ``128 + signum`` (143 for SIGTERM)."""
    return 128 + int(signum)


def interrupt_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` in the checkpoint folder (the run folder's ``checkpoints/``)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or Path(
        trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / "last.ckpt"


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The most recent checkpoint written by the ModelCheckpoint callback, if any."""
    callback = trainer.checkpoint_callback
    for path in (getattr(callback, "last_model_path", ""),
                 getattr(callback, "best_model_path", "")):
        if path and Path(path).is_file():
            return str(path)
    return None
