"""What a user does: SIGTERM a real ``lightning-cli fit`` mid-epoch, resume with ``--ckpt_path``.

Every fragment in ``configs/methods/`` (enumerated, not listed) runs with the real GLUE MRPC
data fragment (its ``max_epochs: 10`` makes the schedule ask ``estimated_stepping_batches``,
which builds the training loader before the checkpoint is restored: the path the older resume
tests, which set only ``max_steps``, never took), a sample limit (40 of 48 rows, batch 4:
10 batches an epoch), validation every 5 batches and 14 steps:

1. the uninterrupted reference run (one per method, shared by the checks below);
2. a real ``lightning-cli`` subprocess, SIGTERM after step 7 (mid-epoch, after the step-5
   validation): exit status 143, a resumable ``last.ckpt`` at step 7, no exported adapter;
3. resume with ``--ckpt_path`` from that ``last.ckpt``, and again from the checkpoint written
   after the step-5 validation, each to the end (past an epoch end and two validations).

Each resumed run must end with the weights of 1, bit for bit: an inexact resume (a replayed
batch, a lost RNG or optimizer state, a wrong epoch order) would change them. Reference and
resumed runs go through the same entry point (``app.cli.main``) in this process with one
thread, like the subprocess, to save an interpreter start each. Four methods repeat it as
two-process CPU DDP jobs (every run a subprocess; SIGTERM after step 7, in the second epoch).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from ddp_dump import run_cli
from test_resume_methods import _check_method_applied, method_fragment

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "configs/methods").glob("*.yaml"))
SIGTERM_EXIT = 128 + int(signal.SIGTERM)


def _project_classes(name: str) -> tuple[str | None, str, bool]:
    """``(adapter class, optimizer module, has a callback or optimizer of this project)``."""
    init = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())
    model = init["model"]["init_args"]
    adapter = (model.get("adapter") or {}).get("class_path")
    optimizer = model["optimizer"]["class_path"]
    callbacks = [c["class_path"] for c in (init.get("trainer") or {}).get("callbacks", [])]
    ours = optimizer.startswith("app.") or any(c.startswith("app.callbacks.") for c in callbacks)
    return adapter, optimizer.rsplit(".", 1)[0], ours


def ddp_methods() -> list[str]:
    """Four fragments for the DDP resume: those whose state lives outside PEFT and torch (a
    callback or optimizer of this project), one per (adapter class, optimizer module)."""
    chosen: dict[tuple, str] = {}
    for name in METHODS:
        adapter, optimizer, ours = _project_classes(name)
        if ours:
            chosen.setdefault((adapter, optimizer), name)
    return sorted(chosen.values())[:4]


def _args(tiny: Path, glue_dir: Path, method: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/data/glue_mrpc.yaml"), "--config", str(method),
            "--model.init_args.checkpoint", str(tiny), "--data.init_args.data_dir", str(glue_dir),
            "--data.init_args.max_length", "32", "--data.init_args.max_train_samples", "40",
            "--data.init_args.batch_size", "4", "--trainer.max_steps", "14",
            "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--seed_everything", "7",
            "--trainer.default_root_dir", str(root / "runs"), *extra]


def _dump(root: Path) -> list[str]:
    return ["--trainer.callbacks+=ddp_dump.DumpParams", f"--trainer.callbacks.dirpath={root}"]


def _sigterm_at(step: int, rank: int = 0) -> list[str]:
    # one rank only (the job's main process by default, as a scheduler signalling it would):
    # the ranks agree on the stop at the next batch end
    return ["--trainer.callbacks+=test_resume_sigterm.SigtermAtStep",
            f"--trainer.callbacks.step={step}", f"--trainer.callbacks.rank={rank}"]


class SigtermAtStep(L.Callback):
    """Sends SIGTERM to the process of global rank ``rank`` right after step ``step``."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def _ok(proc, status: int = 0) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


def _run_folders(root: Path) -> list[Path]:
    return sorted((root / "runs/lightning_logs").iterdir(), key=lambda p: int(p.name[8:]))


def _validated_at(folder: Path) -> list[int]:
    """The steps after which ``val/score`` was logged (TensorBoard counts from 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step + 1 for event in events.Scalars("val/score")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "rank0.pt", weights_only=True)["params"]


def _same(got: dict, want: dict, world: int, folder: Path) -> None:
    assert got.keys() == want.keys() and want
    for name, value in want.items():
        assert torch.equal(got[name], value), (name, (got[name] - value).abs().max().item())
    if world == 2:  # both ranks end identical
        other = torch.load(folder / "rank1.pt", weights_only=True)["params"]
        for name, value in got.items():
            assert torch.equal(other[name], value), name


_REFERENCE: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


@pytest.fixture
def one_thread():
    """In-process runs use one thread, as the subprocesses do (``OMP_NUM_THREADS=1``), so
    both compute bit for bit the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _in_process(args: list[str]):
    """``lightning-cli ARGS`` in this process (the CLI the entry point builds, without the
    start-up cost of a new interpreter); returns the CLI object."""
    from app.cli import build_cli

    return build_cli(args)


def _reference(name: str, world: int, tiny: Path, glue_dir: Path, method: Path,
               folder: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    """The uninterrupted run of ``name`` (computed once per method and world size; DDP runs
    are subprocesses, single-process ones run in this process)."""
    key = (name, world)
    if key not in _REFERENCE:
        folder.mkdir(parents=True)
        args = _args(tiny, glue_dir, method, folder, *extra, *_dump(folder / "dump"))
        if world == 1:
            _check_method_applied(name, _in_process(args))  # the fragment, not the defaults
        else:
            _ok(run_cli(*args, cwd=folder))
        state = torch.load(folder / "dump/rank0.pt", weights_only=True)
        assert state["global_step"] == 14 and state["world_size"] == world
        _REFERENCE[key] = state["params"]
    return _REFERENCE[key]


def _interrupted(root: Path, step: int, proc) -> Path:
    """Checks of a SIGTERM-stopped run; returns its run folder."""
    _ok(proc, SIGTERM_EXIT)
    folder = _run_folders(root)[-1]
    last = folder / "checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["global_step"] == step
    assert not (folder / "adapter").exists()  # a stopped run exports no result
    assert f"--ckpt_path {last}" in proc.stderr + proc.stdout
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_sigterm_mid_epoch_then_resume_is_exact(name: str, tiny_ckpt, glue_dir: Path,
                                                tmp_path: Path, one_thread) -> None:
    tiny = tiny_ckpt("bert")
    method = method_fragment(name, tmp_path)
    want = _reference(name, 1, tiny, glue_dir, method, tmp_path / "ref", [])
    root = tmp_path / "stopped"
    root.mkdir()
    stopped = _interrupted(root, 7, run_cli(*_args(tiny, glue_dir, method, root,
                                                   *_sigterm_at(7)), cwd=root))
    (after_val,) = (stopped / "checkpoints").glob("step5-*.ckpt")  # written after validation
    for start in (stopped / "checkpoints/last.ckpt", after_val):
        dump = root / f"dump-{start.stem}"
        _in_process(_args(tiny, glue_dir, method, root, "--ckpt_path", str(start), *_dump(dump)))
        assert torch.load(dump / "rank0.pt", weights_only=True)["global_step"] == 14
        _same(_weights(dump), want, 1, dump)


@pytest.mark.slow
@pytest.mark.parametrize("name", ddp_methods())
def test_ddp_sigterm_mid_epoch_then_resume_is_exact(name: str, tiny_ckpt, glue_dir: Path,
                                                    tmp_path: Path) -> None:
    tiny = tiny_ckpt("bert")
    method = method_fragment(name, tmp_path)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    want = _reference(name, 2, tiny, glue_dir, method, tmp_path / "ref", ddp)
    root = tmp_path / "stopped"
    root.mkdir()

    def run(*extra: str):
        return run_cli(*_args(tiny, glue_dir, method, root, *ddp, *extra), cwd=root)

    # 5 batches an epoch per rank: step 7 is mid second epoch
    first = _interrupted(root, 7, run(*_sigterm_at(7)))
    _ok(run("--ckpt_path", str(first / "checkpoints/last.ckpt"), *_dump(root / "dump")))
    _same(_weights(root / "dump"), want, 2, root / "dump")


@pytest.mark.slow
def test_sigterm_at_an_epochs_last_batch_stops_one_batch_later_and_resumes_exactly(
        tiny_ckpt, glue_dir: Path, tmp_path: Path, one_thread) -> None:
    """SIGTERM right after step 10, the last of the first epoch's 10 batches (a validation
    due): that validation runs to its end, the stop comes after step 11, and the resumes from
    ``last.ckpt`` and from the checkpoint the step-10 validation wrote (at the epoch's last
    batch) end on the uninterrupted weights. A stop right at the epoch's end
    left a checkpoint Lightning resumed a batch off."""
    tiny = tiny_ckpt("bert")
    method = method_fragment("lora", tmp_path)
    want = _reference("lora", 1, tiny, glue_dir, method, tmp_path / "ref", [])
    root = tmp_path / "stopped"
    root.mkdir()
    keep_all = ["--checkpoint.save_top_k", "-1"]  # the step-10 validation's checkpoint too
    stopped = _interrupted(root, 11, run_cli(*_args(tiny, glue_dir, method, root, *keep_all,
                                                    *_sigterm_at(10)), cwd=root))
    assert _validated_at(stopped) == [5, 10]
    (at_epoch_end,) = (stopped / "checkpoints").glob("step10-*.ckpt")
    for start in (stopped / "checkpoints/last.ckpt", at_epoch_end):
        dump = root / f"dump-{start.stem}"
        _in_process(_args(tiny, glue_dir, method, root, "--ckpt_path", str(start),
                          *_dump(dump)))
        _same(_weights(dump), want, 1, dump)


@pytest.mark.slow
def test_ddp_sigterm_to_the_other_rank_before_a_validation_is_exact(tiny_ckpt, glue_dir: Path,
                                                                    tmp_path: Path) -> None:
    """The signal reaches rank 1 only, right after step 10: the last batch of the second
    epoch, with a validation due. The ranks agree to stop; at an epoch's last batch the stop
    waits one batch (a checkpoint written after the epoch's end is one Lightning's restart
    misreads), so both validate, start the third epoch, stop after step 11 with exit 143, and
    the resume ends bit for bit on the uninterrupted weights. GaLore: its projection refresh
    is a collective too (the run that once hung)."""
    tiny = tiny_ckpt("bert")
    method = method_fragment("galore", tmp_path)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    want = _reference("galore", 2, tiny, glue_dir, method, tmp_path / "ref", ddp)
    root = tmp_path / "stopped"
    root.mkdir()

    def run(*extra: str):
        return run_cli(*_args(tiny, glue_dir, method, root, *ddp, *extra), cwd=root)

    first = _interrupted(root, 11, run(*_sigterm_at(10, rank=1)))
    assert _validated_at(first) == [5, 10]  # the step-10 validation ran to its end
    _ok(run("--ckpt_path", str(first / "checkpoints/last.ckpt"), *_dump(root / "dump")))
    _same(_weights(root / "dump"), want, 2, root / "dump")


def test_ddp_methods_are_four_distinct_kinds() -> None:
    chosen = ddp_methods()
    assert len(chosen) == 4 and set(chosen) <= set(METHODS)
    assert len({_project_classes(n)[:2] for n in chosen}) == 4
