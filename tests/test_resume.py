"""Stopping at step k and resuming with ``--ckpt_path`` ends exactly like never stopping."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import glue_run_config, write_yaml

from app.cli import build_cli
from app.data.resumable import EpochShuffleSampler


class Crash(RuntimeError):
    """The simulated failure."""


class StopAtStep(L.Callback):
    """Simulates a crash right after step ``step`` was checkpointed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise Crash(f"simulated crash at step {trainer.global_step}")


def trainable(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.model.named_parameters()
            if p.requires_grad}


#: How the checkpoint the run resumes from was written: after every training batch, or once
#: per epoch after validation, or once per epoch at the end of training (what ModelCheckpoint
#: does by default when validation runs once per epoch, as in the app's configs).
SAVE = {"step": ("--checkpoint.every_n_train_steps", "1"),
        "epoch-validation": ("--checkpoint.every_n_epochs", "1",
                             "--checkpoint.save_on_train_epoch_end", "false"),
        "epoch-train-end": ("--checkpoint.every_n_epochs", "1",
                            "--checkpoint.save_on_train_epoch_end", "true")}


def run(tmp: Path, ckpt: Path, glue_dir: Path, adapter: dict | None, *extra: str,
        save: str = "step"):
    # 48 rows / batch 8 = 6 batches per epoch; 15 steps cross two epoch ends.
    cfg = glue_run_config(ckpt, glue_dir, tmp / "runs", adapter=adapter, max_steps=15,
                          val_check_interval=None, check_val_every_n_epoch=1)
    cfg["trainer"].pop("val_check_interval")
    path = write_yaml(tmp / "run.yaml", cfg)
    return build_cli(["fit", "--config", str(path), *SAVE[save],
                      "--checkpoint.monitor", "null", "--checkpoint.filename", "step{step}",
                      *extra])


LORA_DROPOUT = {"class_path": "peft.LoraConfig",
                "init_args": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}}


@pytest.mark.parametrize("adapter", [LORA_DROPOUT, None], ids=["lora", "full"])
@pytest.mark.parametrize("stop", [4, 6, 9], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_resume_equals_uninterrupted(adapter, stop: int, tiny_ckpt, glue_dir: Path,
                                     tmp_path: Path) -> None:
    ckpt = tiny_ckpt("bert")
    whole = trainable(run(tmp_path / "a", ckpt, glue_dir, adapter))

    stopped = tmp_path / "b"
    with pytest.raises(Crash):
        run(stopped, ckpt, glue_dir, adapter, "--trainer.callbacks+=test_resume.StopAtStep",
            f"--trainer.callbacks.step={stop}")
    last = next((stopped / "runs/lightning_logs").iterdir()) / "checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == stop
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches"] == (stop - 1) % 6 + 1
    resumed = run(stopped, ckpt, glue_dir, adapter, "--ckpt_path", str(last))
    assert resumed.trainer.global_step == 15
    got = trainable(resumed)
    assert got.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("save", ["epoch-validation", "epoch-train-end"])
@pytest.mark.parametrize("stop", [6, 12], ids=["first-epoch", "second-epoch"])
def test_resume_from_an_epoch_end_checkpoint(save: str, stop: int, tiny_ckpt, glue_dir: Path,
                                             tmp_path: Path) -> None:
    """Lightning restarts such a checkpoint by re-running the epoch's end, which counts the
    epoch twice in the number it gives ``set_epoch``; the sampler must still replay the next
    epoch's order (it reads ``trainer.current_epoch``), or the weights drift apart."""
    ckpt = tiny_ckpt("bert")
    whole = trainable(run(tmp_path / "a", ckpt, glue_dir, LORA_DROPOUT, save=save))
    stopped = tmp_path / "b"
    with pytest.raises(Crash):
        run(stopped, ckpt, glue_dir, LORA_DROPOUT, "--trainer.callbacks+=test_resume.StopAtStep",
            f"--trainer.callbacks.step={stop + 1}", save=save)
    (saved,) = (next((stopped / "runs/lightning_logs").iterdir()) / "checkpoints").glob(
        f"step{stop}*.ckpt")  # the checkpoint written at the end of the epoch
    state = torch.load(saved, weights_only=True)
    assert state["global_step"] == stop and state["epoch"] == stop // 6 - 1
    resumed = run(stopped, ckpt, glue_dir, LORA_DROPOUT, "--ckpt_path", str(saved), save=save)
    assert resumed.trainer.global_step == 15
    got = trainable(resumed)
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("stop", [4, 9], ids=["mid-epoch", "second-epoch"])
def test_resume_when_the_schedule_builds_the_loader_before_the_restore(
        stop: int, tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """With ``max_epochs`` set (every data fragment sets it) the schedule's
    ``estimated_stepping_batches`` builds the training loader before Lightning restores the
    loops, and Lightning then never applied the saved position: the resumed run replayed the
    epoch from its first batch. The runs above set only ``max_steps``, for which Lightning
    answers without building the loader, so they never took this path."""
    ckpt = tiny_ckpt("bert")
    epochs = ("--trainer.max_epochs", "10")
    whole = trainable(run(tmp_path / "a", ckpt, glue_dir, LORA_DROPOUT, *epochs))
    stopped = tmp_path / "b"
    with pytest.raises(Crash):
        run(stopped, ckpt, glue_dir, LORA_DROPOUT, *epochs,
            "--trainer.callbacks+=test_resume.StopAtStep", f"--trainer.callbacks.step={stop}")
    last = next((stopped / "runs/lightning_logs").iterdir()) / "checkpoints/last.ckpt"
    resumed = run(stopped, ckpt, glue_dir, LORA_DROPOUT, *epochs, "--ckpt_path", str(last))
    assert resumed.trainer.global_step == 15
    got = trainable(resumed)
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], rtol=0, atol=0, msg=name)


def test_epoch_sampler_reads_the_epoch_from_the_trainer_when_iteration_starts() -> None:
    epoch = {"now": 1}
    sampler = EpochShuffleSampler(20, seed=3, epoch_fn=lambda: epoch["now"])
    sampler.set_epoch(2)  # what Lightning passes after an epoch-end restart
    plain = EpochShuffleSampler(20, seed=3)
    orders = {}
    for e in (1, 2):
        plain.set_epoch(e)
        orders[e] = list(plain)
    assert orders[1] != orders[2]
    assert list(sampler) == orders[1] and sampler.epoch == 1
    epoch["now"] = 2
    assert list(sampler) == orders[2]


def test_epoch_sampler_is_a_function_of_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(20, seed=3), EpochShuffleSampler(20, seed=3)
    a.set_epoch(2)
    b.set_epoch(1)
    list(b)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.skip_next(5)
    assert list(b) == list(a)[5:]
    assert list(b) == list(a)  # skipping applies once
    b.skip_next(5)
    b.set_epoch(3)  # the saved position belonged to epoch 2: epoch 3 starts at 0
    assert len(list(b)) == 20
    c = EpochShuffleSampler(20, seed=4)
    c.set_epoch(2)
    assert list(c) != list(a)


def test_epoch_sampler_shards_one_order_over_ranks() -> None:
    """Two ranks see disjoint shards of the same epoch order (padded like DistributedSampler)
    and each resumes at its own next batch."""
    from torch.utils.data import DistributedSampler

    full = EpochShuffleSampler(11, seed=5)
    full.set_epoch(1)
    ranks = [EpochShuffleSampler(11, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
        assert isinstance(sampler, DistributedSampler)  # Lightning must not wrap it again
        assert len(sampler) == 6
    order = list(full)
    shards = [list(s) for s in ranks]
    padded = order + order[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
    assert sorted(set(shards[0] + shards[1])) == list(range(11))
    ranks[1].skip_next(4)
    assert list(ranks[1]) == shards[1][4:]
