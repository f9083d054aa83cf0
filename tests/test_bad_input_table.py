"""One table of bad inputs: each stops before training with exit status 2 and one message that
says what to change. Interruptions (non-finite loss, SIGTERM, Ctrl-C) are in
``test_run_guard.py``; the parse-time cases of ``test_bad_inputs.py`` are repeated here in
short so the table is complete.

Every case runs the real ``lightning-cli`` entry point (``app.cli.main``) on the tiny BERT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from tiny import LORA, glue_run_config, write_yaml

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]
FSDP_ON_CPU = ("--config", str(ROOT / "configs/strategy/fsdp.yaml"), "--trainer.accelerator",
               "cpu", "--trainer.devices", "1")
MODEL_PARALLEL = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                  "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}


def _adapter(class_path: str, **init_args: Any) -> dict:
    return {"class_path": class_path, "init_args": {"r": 4, **init_args}}


def _galore(**init_args: Any) -> dict:
    return {"class_path": "app.optim.galore.GaLoreAdamW",
            "init_args": {"lr": 1e-3, "rank": 4, "target_modules": ["query"], **init_args}}


STELLA = _adapter("app.adapters.stella.StellaConfig", alpha=8.0)
STELLA_CB = [{"class_path": "app.callbacks.stella.StellaCallback"}]
M = "model.init_args."


@dataclass
class Case:
    """A bad input: config edits (dotted path -> value), extra CLI args, expected messages."""

    id: str
    edits: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()


CASES = [
    # parse and instantiation time
    Case("misspelled-yaml-key", {"trainer.max_epoch": 3}, expect=("max_epoch",)),
    Case("unknown-glue-task", args=("--data.init_args.task", "rtee"),
         expect=("unknown GLUE task 'rtee'", "mnli")),
    Case("missing-checkpoint-folder", args=(f"--{M}checkpoint", "./models/missing"),
         expect=("looks like a path but no such folder exists",)),
    Case("missing-data-file", args=("--data.init_args.data_dir", "{partial}"),
         expect=("has no dev.tsv",)),
    Case("targets-match-nothing",
         {M + "adapter": _adapter("peft.LoraConfig", target_modules=["q_proj", "v_proj"])},
         expect=("['q_proj', 'v_proj'] match no module", "'query'")),
    Case("asymmetric-with-dora",
         {M + "adapter": _adapter("app.adapters.lora.AsymmetricLoraConfig", use_dora=True)},
         expect=("Asymmetric LoRA is plain LoRA with a frozen factor; set use_dora: false",)),
    Case("allora-with-dropout",
         {M + "adapter": _adapter("app.adapters.lora.AlloraConfig", lora_dropout=0.05)},
         expect=("lora_dropout=0.05 (ALLoRA uses no dropout; set 0)",)),
    # LoRA+ is its own adapter now (app.adapters.loraplus.LoraPlusConfig), so "a ratio
    # without a PEFT adapter" cannot be written any more; its nearest bad input is a bad ratio.
    Case("loraplus-ratio-not-positive",
         {M + "adapter": _adapter("app.adapters.loraplus.LoraPlusConfig", loraplus_lr_ratio=0)},
         expect=("loraplus_lr_ratio must be a finite number > 0, got 0",)),
    Case("galore-with-adapter", {M + "optimizer": _galore()},
         expect=("GaLore/GaRare optimise full weights; set model.init_args.adapter: null",)),
    Case("galore-rank-above-weight", {M + "adapter": None, M + "optimizer": _galore(rank=64)},
         expect=("rank=64 exceeds min(p, q)=32",)),
    Case("drift-threshold-negative",
         {"trainer.callbacks": [{"class_path": "app.callbacks.drift_monitor.OrthogonalityDrift",
                                 "init_args": {"threshold": -1.0}}]},
         expect=("OrthogonalityDrift threshold must be positive or null",)),
    # start of fit, before the first step
    Case("stella-rank-above-layer", {M + "adapter": _adapter("app.adapters.stella.StellaConfig",
                                                             r=64)},
         expect=("r=64 exceeds layer", "U and V need r <= min(in, out) = 32")),
    Case("stella-callback-on-lora", {"trainer.callbacks": STELLA_CB},
         expect=("StellaCallback needs model.init_args.adapter class_path "
                 "app.adapters.stella.StellaConfig, got LoraConfig",)),
    Case("landing-manifold-mismatch",
         {M + "adapter": _adapter("app.adapters.manifold_lora.ManifoldLoraConfig",
                                  manifold="sphere"),
          "trainer.callbacks": [{"class_path": "app.callbacks.landing.LandingCallback",
                                 "init_args": {"manifold": "stiefel"}}]},
         expect=("LandingCallback manifold='stiefel' but the adapter's",)),
    Case("geometry-with-16-bit-weights",
         {M + "adapter": STELLA, "trainer.callbacks": STELLA_CB, "trainer.precision": "bf16-true"},
         expect=("trainer.precision='bf16-true'; use trainer.precision=bf16-mixed",)),
    Case("geometry-under-fsdp", {M + "adapter": STELLA, "trainer.callbacks": STELLA_CB},
         args=FSDP_ON_CPU,
         expect=("StellaCallback does not support trainer.strategy=AdapterFSDPStrategy",
                 "use FSDP2 (configs/strategy/fsdp2.yaml) or trainer.strategy=ddp")),
    Case("galore-under-fsdp", {M + "adapter": None, M + "optimizer": _galore()},
         args=FSDP_ON_CPU,
         expect=("GaLoreAdamW does not support trainer.strategy=AdapterFSDPStrategy",
                 "use FSDP2 (configs/strategy/fsdp2.yaml", "trainer.strategy=ddp")),
    Case("loraplus-under-fsdp",
         {M + "adapter": _adapter("app.adapters.loraplus.LoraPlusConfig", loraplus_lr_ratio=16.0)},
         args=FSDP_ON_CPU,
         expect=("(LoRA+) does not support trainer.strategy=AdapterFSDPStrategy",)),
    Case("fsdp-fragment-on-cpu", args=FSDP_ON_CPU,
         expect=("AdapterFSDPStrategy (configs/strategy/fsdp.yaml) needs GPUs",
                 "configs/strategy/ddp.yaml")),
    Case("model-parallel-strategy", {"trainer.strategy": MODEL_PARALLEL},
         expect=("does not support trainer.strategy=ModelParallelStrategy",
                 "use FSDP2 through configs/strategy/fsdp2.yaml")),
    Case("galore-under-model-parallel",
         {M + "adapter": None, M + "optimizer": _galore(), "trainer.strategy": MODEL_PARALLEL},
         expect=("GaLoreAdamW does not support trainer.strategy=ModelParallelStrategy",)),
    Case("resume-from-another-methods-checkpoint", args=("--ckpt_path", "{bogus}"),
         expect=("checkpoint does not match this model and adapter",
                 "resume with the same method and model config")),
]


@pytest.fixture
def no_distributed_env(monkeypatch: pytest.MonkeyPatch):
    """Strategies that start a process group in this process leave it and env vars behind."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _placeholders(tmp_path: Path, glue_dir: Path) -> dict[str, str]:
    partial = tmp_path / "glue_partial" / "RTE"
    partial.mkdir(parents=True)
    (partial / "train.tsv").write_text((glue_dir / "RTE/train.tsv").read_text())
    bogus = tmp_path / "other_method.ckpt"
    torch.save({"state_dict": {"model.bert.encoder.layer.0.output.dense.weight": torch.zeros(2)},
                "global_step": 0, "epoch": 0, "pytorch-lightning_version": L.__version__}, bogus)
    return {"{partial}": str(partial.parent), "{bogus}": str(bogus)}


def test_cases_have_unique_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_stops_before_training_with_its_message(case: Case, tiny_ckpt, glue_dir: Path,
                                                          tmp_path: Path, capsys,
                                                          no_distributed_env) -> None:
    root = tmp_path / "runs"
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, root, adapter=LORA)
    for dotted, value in case.edits.items():
        _set(cfg, dotted, value)
    fill = _placeholders(tmp_path, glue_dir)
    args = [fill.get(a, a) for a in case.args]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg)), *args])
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert exc.value.code == 2, out[-2000:]
    for expected in case.expect:
        assert expected in out, f"{expected!r} not in:\n{out[-2000:]}"
    trained = [p for p in root.rglob("*") if p.suffix == ".ckpt" or p.name == "adapter"]
    assert not trained, trained
