"""Sharded checkpoints and exports gather only what is trained (FSDP1 and FSDP2), and FSDP2
computes in bf16 with fp32 masters and fp32 gradient reduction under ``bf16-mixed``; two gloo
processes of ``sharded_save_driver.py`` against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from tiny import subprocess_env

    out = tmp_path_factory.mktemp("sharded_saves")
    env = subprocess_env(MASTER_ADDR="127.0.0.1", WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(HERE / "sharded_save_driver.py"), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp1_checkpoint_gathers_the_trained_tensors_only(reports: list[dict]) -> None:
    for report in reports:
        fsdp1 = report["fsdp1"]
        assert fsdp1["keys_equal"] and fsdp1["shapes_equal"] and fsdp1["max_diff"] == 0.0
        # one exchange of piece sizes, one of the kept pieces: each rank receives every
        # rank's buffer (padded to the largest), so at most world x (kept bytes + padding)
        assert fsdp1["calls"] == 2
        assert fsdp1["gathered_bytes"] <= 2 * report["kept_bytes"] * 1.5 + 1024
        assert fsdp1["gathered_bytes"] < 0.25 * report["model_bytes"]


def test_fsdp2_checkpoint_gathers_the_trained_tensors_only(reports: list[dict]) -> None:
    for report in reports:
        fsdp2 = report["fsdp2"]
        assert fsdp2["keys_equal"] and fsdp2["max_diff"] == 0.0
        assert fsdp2["gathered_bytes"] == report["kept_bytes"]  # exactly the kept tensors


def test_fsdp2_bf16_mixed_policy_bf16_compute_fp32_masters_and_reduction(
        reports: list[dict]) -> None:
    for report in reports:
        fsdp2 = report["fsdp2"]
        assert fsdp2["forward_weight_dtypes"] == ["torch.bfloat16"]
        assert fsdp2["grad_dtypes"] == ["torch.float32"] and fsdp2["grad_keys_equal"]
        # one process under autocast on the same global batch: bf16 rounding apart
        # (measured 3.2e-3)
        assert fsdp2["max_rel_grad_error"] < 0.02, fsdp2["max_rel_grad_error"]


def test_mixed_precision_policy_follows_the_trainer_precision() -> None:
    import torch

    from app.fsdp2 import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("16-mixed").param_dtype == torch.float16
    assert mixed_precision_policy("32-true").param_dtype is None
    assert os.environ.get("WORLD_SIZE") is None  # the driver's variables stayed in it


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "stella", "manifold_stiefel", "galore"])
def test_fsdp2_bf16_mixed_fits_a_bf16_checkpoint(name: str, tiny_ckpt, glue_dir: Path,
                                                 tmp_path: Path) -> None:
    """The whole path through ``lightning-cli`` on two gloo ranks: a bf16-saved checkpoint,
    ``configs/strategy/bf16.yaml`` and FSDP2's policy; both ranks end with the same fp32
    parameters (PEFT adapters, StelLA's retraction, Manifold-LoRA's landing, GaLore's
    projections), the export written."""
    import torch
    import yaml
    from ddp_dump import run_two_ranks
    from test_resume_methods import method_fragment
    from tiny import glue_run_config

    ckpt = tiny_ckpt("bert", torch.bfloat16)
    config = glue_run_config(ckpt, glue_dir, tmp_path / "runs", max_steps=3,
                             limit_val_batches=0, val_check_interval=None)
    fragment = yaml.safe_load(method_fragment(name, tmp_path).read_text())
    config["model"]["init_args"].update(fragment["model"]["init_args"])
    config["trainer"]["callbacks"] = list(fragment.get("trainer", {}).get("callbacks") or [])
    config["checkpoint"] = {"monitor": None}
    rank0, _, proc = run_two_ranks(
        config, tmp_path, 3, "--config", str(HERE.parent / "configs/strategy/fsdp2.yaml"),
        "--trainer.devices", "2", "--trainer.precision", "bf16-mixed")
    assert "precision bf16-mixed | trainable fp32" in proc.stderr + proc.stdout
    params = rank0["params"]
    if config["model"]["init_args"].get("adapter") is None:  # GaLore: every weight trained
        assert {v.dtype for v in params.values()} == {torch.float32}
    else:  # trained factors and head fp32 over the bf16 base
        trained = [n for n in params if any(k in n for k in ("lora_", "stella_",
                                                               "modules_to_save"))]
        assert trained and all(params[n].dtype == torch.float32 for n in trained)
        assert any(v.dtype == torch.bfloat16 for v in params.values())
    assert (sorted((tmp_path / "runs" / "lightning_logs").glob("version_*"))[-1]
            / "adapter").is_dir()
