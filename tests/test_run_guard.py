"""A diverged loss, SIGTERM and Ctrl-C stop a run cleanly; the interrupted run resumes exactly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from test_resume import run, trainable

from app.cli import main


class PoisonAtStep(L.Callback):
    """Makes the loss NaN from optimizer step ``step`` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


class SignalAtStep(L.Callback):
    """Sends a signal right after step ``step``: to this process, or with ``ancestor`` N to
    its N-th parent (1: the process that launched the run, 2: the one that launched that), or
    with ``group`` to that process's whole process group (and with ``again_s`` once more after
    that many seconds), then waits ``wait_s`` so that the stop lands mid-run; with ``once`` (a
    path) only in the first run that gets there, so a rerun with the same options runs
    through."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), ancestor: int = 0,
                 wait_s: float = 0.0, once: str | None = None, group: bool = False,
                 again_s: float | None = None) -> None:
        self.step = step
        self.signum = signum
        self.ancestor = ancestor
        self.wait_s = wait_s
        self.once = once
        self.group = group  # signal the ancestor's whole process group (kill -- -PGID)
        self.again_s = again_s  # then the same signal again after this long (a second kill)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        if self.once is not None:
            if os.path.exists(self.once):
                return
            Path(self.once).touch()
        pid = os.getpid()
        for _ in range(self.ancestor):
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        for repeat in range(1 if self.again_s is None else 2):
            if repeat:
                time.sleep(self.again_s)
            if self.group:
                os.killpg(os.getpgid(pid), self.signum)
            else:
                os.kill(pid, self.signum)
        time.sleep(self.wait_s)


def test_non_finite_loss_stops_with_step_and_checkpoint(tiny_ckpt, glue_dir: Path,
                                                        tmp_path: Path, capsys) -> None:
    from tiny import glue_run_config, write_yaml

    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", max_steps=6)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--checkpoint.every_n_train_steps", "2",
              "--checkpoint.monitor", "null", "--checkpoint.filename", "step{step}",
              "--trainer.callbacks+=test_run_guard.PoisonAtStep",
              "--trainer.callbacks.step=5"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite training loss (nan) at step 5" in err
    assert "last.ckpt" in err and "--ckpt_path" in err
    (run_dir,) = (tmp_path / "runs/lightning_logs").iterdir()
    assert not (run_dir / "adapter").exists()  # no result is written for a diverged run
    state = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupt_leaves_resumable_checkpoint(signum, tiny_ckpt, glue_dir: Path,
                                               tmp_path: Path) -> None:
    ckpt = tiny_ckpt("bert")
    whole = trainable(run(tmp_path / "a", ckpt, glue_dir, None))
    stopped = tmp_path / "b"
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(BaseException) as exc:  # Lightning re-raises SIGTERMException
        run(stopped, ckpt, glue_dir, None, "--checkpoint.every_n_train_steps", "100",
            "--trainer.callbacks+=test_run_guard.SignalAtStep", "--trainer.callbacks.step=4",
            f"--trainer.callbacks.signum={int(signum)}")
    assert "SIGTERM" in type(exc.value).__name__
    # the exit status a shell reports for the signal: 143 (SIGTERM), 130 (Ctrl-C), never 0
    assert exc.value.code == 128 + int(signum)
    assert signal.getsignal(signal.SIGINT) == previous  # handler restored
    (run_dir,) = (stopped / "runs/lightning_logs").iterdir()
    assert not (run_dir / "adapter").exists()
    assert not list(run_dir.rglob(".*.tmp"))
    last = run_dir / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed = run(stopped, ckpt, glue_dir, None, "--ckpt_path", str(last))
    got = trainable(resumed)
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=0, msg=name)


def test_main_exits_non_zero_after_sigterm(tiny_ckpt, glue_dir: Path, tmp_path: Path,
                                           capsys) -> None:
    """``lightning-cli`` (``app.cli.main``) exits 143 even when no RunGuard set the code."""
    from tiny import glue_run_config, write_yaml

    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", max_steps=6)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--run_guard.save_on_interrupt", "false",
              "--trainer.callbacks+=test_run_guard.SignalAtStep", "--trainer.callbacks.step=2"])
    assert exc.value.code == 143
