"""Every method fragment under FSDP2 (``configs/strategy/fsdp2.yaml``) on two gloo processes.

One two-process job (:mod:`fsdp2_driver`: all fragments of ``configs/methods/`` fitted one
after another in one process group) and one single process on the same global batches
(2 x 8) serve every assertion: after 20 optimizer steps the parameters equal the single
process's (fp32, 1e-5); StelLA's factors are orthonormal and Manifold-LoRA's drift is small;
resuming from a sharded (and a full) checkpoint is exact; the export is the same PEFT folder
and loads through plain PEFT with the single-process logits; the manifold step's collectives
move ``r x r`` per factor and GaLore's projector refreshes (every 5 steps here, the driver's
``PROJ_GAP``) one ``min(p, q)^2`` float64 Gram matrix per targeted weight.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = sorted(p.stem for p in (ROOT / "configs/methods").glob("*.yaml"))
RUN = METHODS
RESUME_SHARDED = ["stella", "garare", "galore"]
RESUME_FULL = ["lora"]
STEPS = 20


def _driver(out: Path, ckpt: Path, data: Path, world: int, port: int) -> list:
    from tiny import subprocess_env

    cmd = [sys.executable, str(HERE / "fsdp2_driver.py"), "--out", str(out), "--ckpt",
           str(ckpt), "--data", str(data), "--world", str(world), "--steps", str(STEPS),
           "--methods", ",".join(RUN)]
    if world == 1:
        return [subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                 stderr=open(out.parent / "single.err", "w"))]
    cmd += ["--resume", ",".join(RESUME_SHARDED), "--resume-full", ",".join(RESUME_FULL)]
    procs = []
    for rank in range(world):
        env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                             WORLD_SIZE=str(world), NODE_RANK="0", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(out.parent / f"rank{rank}.err", "w")))
    return procs


@pytest.fixture(scope="module")
def runs(tiny_ckpt, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/f2/<method>`` (two ranks, FSDP2) and ``root/single/<method>`` (one process)."""
    root = tmp_path_factory.mktemp("fsdp2")
    ckpt = root / "bert"  # the tiny model with dropout off: equal runs on 1 and 2 processes
    config = json.loads((tiny_ckpt("bert") / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    import shutil

    shutil.copytree(tiny_ckpt("bert"), ckpt)
    (ckpt / "config.json").write_text(json.dumps(config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = _driver(root / "f2", ckpt, glue_dir, 2, port) + _driver(
        root / "single", ckpt, glue_dir, 1, port)
    for proc in procs:
        proc.wait(timeout=3600)
    for name, proc in zip(("rank0", "rank1", "single"), procs):
        assert proc.returncode == 0, (root / f"{name}.err").read_text()[-3000:]
    return root


def _dump(root: Path, method: str) -> dict:
    return torch.load(root / method / "dump" / "rank0.pt", weights_only=True)


def _tall(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] >= t.shape[1] else t.T


@pytest.mark.slow
@pytest.mark.parametrize("method", RUN)
def test_two_fsdp2_ranks_equal_one_process(runs: Path, method: str) -> None:
    sharded, single = _dump(runs / "f2", method), _dump(runs / "single", method)
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["global_step"] == single["global_step"] == STEPS
    assert sharded["sharded"], "parameters are not DTensors"
    assert sharded["trainable"] == single["trainable"]
    rank1 = torch.load(runs / "f2" / method / "dump" / "rank1.pt", weights_only=True)
    for name in sharded["trainable"]:
        torch.testing.assert_close(sharded["params"][name], single["params"][name],
                                   rtol=0, atol=1e-5, msg=name)
        assert torch.equal(sharded["params"][name], rank1["params"][name])
    moved = [n for n in sharded["trainable"] if "lora_A" not in n]
    base = torch.load(runs / "single" / method / "dump" / "rank0.pt", weights_only=True)
    assert any(base["params"][n].abs().sum() > 0 for n in moved)


@pytest.mark.slow
def test_manifolds_hold_under_fsdp2(runs: Path) -> None:
    params = _dump(runs / "f2", "stella")["params"]
    factors = [p for n, p in params.items() if "stella_U" in n or "stella_V" in n]
    assert len(factors) == 8  # U and V of query / value in 2 layers
    for x in map(_tall, factors):
        eye = torch.eye(x.shape[1])
        assert torch.linalg.matrix_norm(x.T @ x - eye) <= 1e-5
    for method in ("manifold_stiefel", "manifold_sphere"):
        params = _dump(runs / "f2", method)["params"]
        bs = [p for n, p in params.items() if "lora_B" in n]
        assert bs
        for b in bs:
            gram = b.T @ b
            err = (gram - torch.eye(b.shape[1]) if method == "manifold_stiefel"
                   else gram.diagonal() - 1.0)
            assert err.norm() < 1e-3, (method, float(err.norm()))


@pytest.mark.slow
@pytest.mark.parametrize("method", RESUME_SHARDED + RESUME_FULL)
def test_resume_from_sharded_or_full_checkpoint_is_exact(runs: Path, method: str) -> None:
    ckpt = runs / "f2" / method / "ckpts" / "step9.ckpt"
    assert ckpt.is_dir() == (method in RESUME_SHARDED)  # DCP folder vs one full file
    whole, resumed = _dump(runs / "f2", method), _dump(runs / "f2", f"{method}-resumed")
    assert resumed["global_step"] == STEPS
    for name in whole["trainable"]:
        assert torch.equal(resumed["params"][name], whole["params"][name]), name
    if ckpt.is_dir():  # adapter-only: the DCP metadata holds the trained tensors only
        import torch.distributed.checkpoint as dcp

        keys = {k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
                if k.startswith("state_dict.")}
        assert {k.removeprefix("state_dict.") for k in keys} == {
            f"model.{n.removeprefix('model.')}" for n in whole["trainable"]}
    else:
        saved = torch.load(ckpt, weights_only=False)
        assert set(saved["state_dict"]) == set(whole["trainable"])


@pytest.mark.slow
@pytest.mark.parametrize("method", RUN)
def test_export_is_the_single_process_folder(runs: Path, method: str) -> None:
    from safetensors.torch import load_file

    ours, theirs = runs / "f2" / method / "runs" / "adapter", runs / "single" / method / \
        "runs" / "adapter"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for path in ours.glob("*.safetensors"):
        a, b = load_file(path), load_file(theirs / path.name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_export_loads_through_plain_peft_with_single_process_logits(runs: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in ("f2", "single"):
        folder = runs / kind / "lora" / "runs" / "adapter"
        config = json.loads((folder / "adapter_config.json").read_text())
        base = AutoModelForSequenceClassification.from_pretrained(
            config["base_model_name_or_path"], config=AutoConfig.from_pretrained(folder))
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            out[kind] = model(input_ids=ids).logits
    torch.testing.assert_close(out["f2"], out["single"], rtol=0, atol=1e-5)


def _collectives(runs: Path, method: str) -> dict[str, dict[str, list[int]]]:
    path = runs / "f2" / method / "collectives.json"
    return json.loads(path.read_text()) if path.is_file() else {}


LAYERS, R, FP32 = 4, 8, 4  # r=8 (the fragments) on q/v of the tiny model's 2 blocks
FACTORS = 2 * LAYERS  # StelLA keeps U and V of each adapted layer on the Stiefel manifold


@pytest.mark.slow
def test_manifold_step_moves_r_by_r_per_factor(runs: Path) -> None:
    (steps,) = _collectives(runs, "stella").values()
    assert sorted(int(k) for k in steps) == list(range(STEPS))
    for sizes in steps.values():  # pre-step X^T G, then post-step (X^T X, X^T N, N^T N)
        assert sizes == [FACTORS * R * R * FP32, FACTORS * 3 * R * R * FP32]


@pytest.mark.slow
@pytest.mark.parametrize("method,per_step", [
    # Manifold-LoRA keeps B of each layer on the manifold. A's balanced rate: (B^T B, A A^T)
    # per layer, r x r; then the landing step (X^T X, X^T N) per B
    ("manifold_stiefel", [LAYERS * 2 * R * R * FP32, LAYERS * 2 * R * R * FP32]),
    # on the sphere the landing needs only B's column norms: 2 vectors of r per layer
    ("manifold_sphere", [LAYERS * 2 * R * R * FP32, LAYERS * 2 * R * FP32]),
    # (B^T B, A A^T) of the 4 adapted layers, one shape group
    ("riemannian_lora", [2 * LAYERS * R * R * FP32]),
])
def test_other_geometry_steps_move_only_r_sized_products(runs: Path, method: str,
                                                         per_step: list[int]) -> None:
    (steps,) = _collectives(runs, method).values()
    assert sorted(int(k) for k in steps) == list(range(STEPS))
    for sizes in steps.values():
        assert sizes == per_step


@pytest.mark.slow
def test_allora_row_norms_need_no_collective(runs: Path) -> None:
    """ALLoRA's fragment scales by rows: B is sharded by rows and A by columns, so every
    norm is local and its step makes no all-reduce at all."""
    assert _collectives(runs, "allora") == {}
    assert _dump(runs / "f2", "allora")["global_step"] == STEPS  # it did train


@pytest.mark.slow
def test_galore_refresh_moves_one_short_side_gram_per_weight(runs: Path) -> None:
    """Refreshes at steps 0, 5, 10, 15 (PROJ_GAP 5), each one all-reduce of ``8 min(p, q)^2``
    bytes (float64) per targeted weight, and no GaLore collective between refreshes."""
    import yaml

    from app.adapters.targets import matches_component

    steps = json.loads((runs / "f2" / "galore" / "projector_collectives.json").read_text())
    fragment = yaml.safe_load((ROOT / "configs/methods/galore.yaml").read_text())
    targets = fragment["model"]["init_args"]["optimizer"]["init_args"]["target_modules"]
    params = _dump(runs / "single", "galore")["params"]
    shapes = [p.shape for n, p in params.items()
              if p.ndim == 2 and "embed" not in n and matches_component(n, targets)]
    assert len(shapes) == 13  # q, k, v, attention output, intermediate, output x 2 + pooler
    expected = sorted(8 * min(shape) ** 2 for shape in shapes)
    assert sorted(int(k) for k in steps) == [0, 5, 10, 15]
    for sizes in steps.values():
        assert sorted(sizes) == expected
    assert sum(expected) == 13 * 8 * 32 * 32


def test_shard_placement_follows_the_long_dimension() -> None:
    from torch.distributed.tensor import Shard

    from app.fsdp2 import shard_placement

    wide = torch.nn.Parameter(torch.zeros(4, 32))
    tall = torch.nn.Parameter(torch.zeros(32, 4))
    frozen = torch.nn.Parameter(torch.zeros(4, 32), requires_grad=False)
    assert shard_placement(wide) == Shard(1) and shard_placement(tall) == Shard(0)
    assert shard_placement(frozen) == Shard(0)
    assert os.path.exists(ROOT / "configs/strategy/fsdp2.yaml")
