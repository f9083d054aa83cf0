"""The benchmarks read their methods from ``configs/methods/`` through the method contract.

A fragment added to the folder is timed by the step-time benchmarks when its method declares a
constraint or a needed callback, with the rank where the method declares it and only the
callbacks it declares; ``bench_geometry.py`` runs end to end on a tiny model and writes one row
per method with its ratio to LoRA.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import fragments  # noqa: E402


@pytest.fixture
def methods_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of ``configs/methods`` the benchmarks read instead."""
    folder = tmp_path / "methods"
    shutil.copytree(ROOT / "configs/methods", folder)
    monkeypatch.setattr(fragments, "METHODS_DIR", folder)
    return folder


def test_a_new_geometry_fragment_is_picked_up_and_a_plain_one_is_not(methods_dir: Path) -> None:
    before = fragments.geometry_fragments()
    assert {"stella", "manifold_stiefel", "manifold_sphere", "galore", "garare"} <= set(before)
    assert not {"lora", "dora", "rslora", "pissa", "full"} & set(before)
    shutil.copy(methods_dir / "stella.yaml", methods_dir / "zz_new_stiefel_method.yaml")
    shutil.copy(methods_dir / "lora.yaml", methods_dir / "zz_plain.yaml")
    after = fragments.geometry_fragments()
    assert after == sorted([*before, "zz_new_stiefel_method"])
    assert fragments.geometry_fragments(adapters_only=True) == [
        n for n in after if n not in ("galore", "garare")]
    assert "zz_plain" in fragments.all_fragments()


def test_rank_goes_where_the_method_declares_it() -> None:
    adapter, optimizer, callbacks, spec = fragments.fragment_parts("stella", 4, ["query"])
    assert spec.rank_field == "adapter.r" and adapter.r == 4
    assert adapter.target_modules == ["query"]
    # the fragment's alpha / r is kept at the new rank
    import yaml

    init = yaml.safe_load((ROOT / "configs/methods/stella.yaml").read_text())
    args = init["model"]["init_args"]["adapter"]["init_args"]
    assert adapter.alpha == args["alpha"] * 4 / args["r"]
    # only the callback the method declares, not the drift monitor the fragment also lists
    assert [type(c).__name__ for c in callbacks] == ["StellaCallback"]

    adapter, optimizer, callbacks, spec = fragments.fragment_parts("galore", 4, ["query"])
    assert adapter is None and spec.rank_field == "optimizer.rank"
    assert optimizer.keywords["rank"] == 4 and optimizer.keywords["target_modules"] == ["query"]
    assert callbacks == []  # its memory monitor is not the method
    assert fragments.baseline("galore") == "full" and fragments.baseline("stella") == "lora"


def test_bench_geometry_runs_and_reports_each_method_against_lora(tiny_ckpt,
                                                                  tmp_path: Path) -> None:
    import bench_geometry

    out = tmp_path / "step_time"
    payload = bench_geometry.main([
        "--checkpoint", str(tiny_ckpt("bert")), "--methods", "stella", "manifold_sphere",
        "--batch", "2", "--length", "8", "--warmup", "1", "--reps", "2", "--overhead-reps", "2",
        "--threads", "1", "--target", "manifold_sphere=1.5", "--out", str(out)])
    results = payload["results"]
    assert list(results) == ["lora", "stella", "manifold_sphere"]
    for row in results.values():
        assert len(row["step_times_ms"]) == 2 and min(row["step_times_ms"]) > 0
        assert row["trainable_params"] > 0
    assert results["lora"]["min_ratio_vs_lora"] == 1.0
    assert results["stella"]["target_ratio"] == 1.10
    assert results["manifold_sphere"]["target_ratio"] == 1.5
    assert results["stella"]["callback_ms"]["post_ms"] > 0  # its post-step hook was timed
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"].keys() == results.keys() and "command" in saved
    assert "| stella |" in out.with_suffix(".md").read_text()


def test_bench_causal_step_pairs_each_method_with_its_baseline(tiny_ckpt, tmp_path: Path) -> None:
    import bench_causal_step

    out = tmp_path / "causal"
    payload = bench_causal_step.main([
        "--checkpoint", str(tiny_ckpt("llama")), "--methods", "stella", "garare", "--rank", "2",
        "--batch", "1", "--length", "8", "--warmup", "1", "--reps", "2", "--threads", "1",
        "--out", str(out)])
    results = payload["results"]
    assert set(results) == {"lora", "full", "stella", "garare"}  # baselines added
    assert results["stella"]["baseline"] == "lora" and results["garare"]["baseline"] == "full"
    assert results["stella"]["target"] == 1.05 and results["lora"]["baseline"] is None
    assert results["garare"]["trainable_params"] > results["stella"]["trainable_params"]
    assert all(min(r["step_times_ms"]) > 0 for r in results.values())
