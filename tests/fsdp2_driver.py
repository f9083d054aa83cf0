"""Test-only driver: fit several method fragments one after another in ONE process group.

``python tests/fsdp2_driver.py --out DIR --world W --methods a,b --resume a ...``

Run as two processes (``LOCAL_RANK`` 0 / 1, ``WORLD_SIZE`` 2: Lightning then uses the
processes it finds instead of launching its own) under ``configs/strategy/fsdp2.yaml``, or
as one process (``--world 1``) on the same global batches (batch 2 x 8). For every method it
writes ``DIR/<method>/rank<k>.pt`` (:class:`ddp_dump.DumpParams`: whole parameters) and the
run folder (checkpoints every epoch end, the PEFT export). ``--resume`` methods are fitted a
second time from the sharded checkpoint of epoch 3 (step 9) into ``DIR/<method>-resumed``.
For every callback with a reducer (the geometry callbacks: StelLA, landing, ALLoRA, the
Riemannian preconditioner) every all-reduce it makes is recorded (``collectives.json``:
``{callback class: {optimizer step: [bytes per call]}}``), for GaLore every all-reduce of
its projector refreshes (``projector_collectives.json``: bytes per call, by optimizer step).
Optimizers with an ``update_proj_gap`` get
``PROJ_GAP`` so that 20 steps see several subspaces (GaLore: refreshes at 0, 5, 10, 15; a
resume at step 9 continues with the stored projector of step 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from tiny import glue_run_config, write_yaml  # noqa: E402

BATCH = 8  # per rank under two ranks; the single process gets 2 x 8
PROJ_GAP = 5  # GaLore / GaRare: a new subspace every 5 steps (the fragments' 200 > 20 steps)


def method_config(method: str, ckpt: Path, data: Path, out: Path, world: int, steps: int,
                  full_checkpoint: bool = False) -> Path:
    """``configs/methods/<method>.yaml`` on the tiny model, dropout off, for ``world`` ranks."""
    spec = yaml.safe_load((ROOT / f"configs/methods/{method}.yaml").read_text())
    cfg = glue_run_config(ckpt, data, out / "runs", max_steps=steps, val_check_interval=None,
                          limit_val_batches=0)
    cfg["model"]["init_args"].update(spec["model"]["init_args"])
    optimizer = cfg["model"]["init_args"]["optimizer"].get("init_args", {})
    if "update_proj_gap" in optimizer:
        optimizer["update_proj_gap"] = PROJ_GAP
    for key, value in (spec.get("trainer") or {}).items():
        cfg["trainer"][key] = value
    adapter = cfg["model"]["init_args"].get("adapter")
    if adapter:
        args = adapter.setdefault("init_args", {})
        for key in ("lora_dropout", "dropout"):
            if key in args:
                args[key] = 0.0  # equal runs on different process counts need no dropout
    cfg["trainer"]["callbacks"] = list(cfg["trainer"].get("callbacks") or []) + [
        {"class_path": "ddp_dump.DumpParams", "init_args": {"dirpath": str(out / "dump")}}]
    cfg["trainer"]["logger"] = False
    if world > 1:
        strategy = yaml.safe_load((ROOT / "configs/strategy/fsdp2.yaml").read_text())["trainer"]
        if full_checkpoint:
            strategy["strategy"]["init_args"]["save_distributed_checkpoint"] = False
        cfg["trainer"].update(strategy, devices=world, accelerator="cpu")
    else:
        cfg["data"]["init_args"]["batch_size"] = 2 * BATCH
    cfg["checkpoint"] = {"dirpath": str(out / "ckpts"), "every_n_epochs": 1,
                         "save_on_train_epoch_end": True, "monitor": None, "save_top_k": -1,
                         "filename": "step{step}", "save_last": False}
    return write_yaml(out / "run.yaml", cfg)


def fit(config: Path, ckpt_path: str | None = None) -> tuple[dict, dict[int, list[int]]]:
    from app.cli import build_cli

    cli = build_cli(["--config", str(config)], run=False)
    recorded = {type(c).__name__: _record_collectives(c) for c in cli.trainer.callbacks
                if hasattr(c, "_reduce")}
    with _record_projector_refreshes(cli.trainer) as refreshes:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path,
                        weights_only=False if ckpt_path else None)
    return {name: steps for name, steps in recorded.items() if steps}, refreshes


@contextlib.contextmanager
def _record_projector_refreshes(trainer: object):
    """Log the bytes of every all-reduce of GaLore's projector refreshes, by optimizer step
    (``trainer.global_step`` while the step runs): wraps
    :func:`app.optim.sharded_projection.reducer`, which each refresh calls for its reducer."""
    from app.manifolds.sharded import AllReduce
    from app.optim import sharded_projection

    steps: dict[int, list[int]] = {}
    reducer = sharded_projection.reducer

    class Counted(AllReduce):
        def __call__(self, t) -> None:
            steps.setdefault(trainer.global_step, []).append(t.numel() * t.element_size())
            super().__call__(t)

    def counted_reducer(p):
        found = reducer(p)
        return None if found is None else Counted(found.group)

    sharded_projection.reducer = counted_reducer
    try:
        yield steps
    finally:
        sharded_projection.reducer = reducer


def _record_collectives(callback: object) -> dict[int, list[int]]:
    """Wrap the callback's reducer (set at train start) to log the bytes of each call by
    optimizer step (``trainer.global_step`` while the optimizer steps)."""
    steps: dict[int, list[int]] = {}
    original = callback.on_train_start

    def on_train_start(trainer, pl_module) -> None:
        original(trainer, pl_module)
        reduce = callback._reduce
        if reduce is None:
            return

        def counted(t) -> None:
            steps.setdefault(trainer.global_step, []).append(t.numel() * t.element_size())
            reduce(t)

        callback._reduce = counted

    callback.on_train_start = on_train_start
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--resume", default="")
    parser.add_argument("--resume-full", default="")
    args = parser.parse_args()
    import torch.distributed as dist

    for method in args.methods.split(","):
        out = args.out / method
        full = method in args.resume_full.split(",")
        config = method_config(method, args.ckpt, args.data, out, args.world, args.steps,
                               full_checkpoint=full)
        steps, refreshes = fit(config)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if steps:
                (out / "collectives.json").write_text(json.dumps(steps))
            if refreshes:
                (out / "projector_collectives.json").write_text(json.dumps(refreshes))
        if method in args.resume.split(",") + args.resume_full.split(","):
            again = args.out / f"{method}-resumed"
            config = method_config(method, args.ckpt, args.data, again, args.world,
                                   args.steps, full_checkpoint=full)
            fit(config, str(out / "ckpts" / "step9.ckpt"))


if __name__ == "__main__":
    main()
