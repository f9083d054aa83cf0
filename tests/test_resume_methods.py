"""Exact resume for the methods not covered elsewhere, each with its real YAML fragment.

Already covered: full and LoRA (``test_resume.py``), StelLA (``test_stella.py``), Manifold-LoRA
on the sphere (``test_manifold_lora.py``), GaRare (``test_galore_training.py``). Here the
rest go through the ``test_resume.py`` harness (the real CLI, a checkpoint every step, a crash
after step 4, resume with ``--ckpt_path``): the resumed run ends bit-identical to one never
stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_resume import Crash, run, trainable
from tiny import write_yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "configs/methods").glob("*.yaml"))
#: LoRA-family options for the 32-wide tiny BERT (its attention projections are query / value).
TINY_ADAPTER = {"r": 4, "target_modules": ["query", "value"]}


def method_fragment(name: str, folder: Path) -> Path:
    """``configs/methods/<name>.yaml`` written to ``folder`` with sizes for the tiny model.

    Adapters: rank 4 on ``query`` / ``value`` (the scale ``alpha / r`` as in the fragment);
    GaLore / GaRare: rank 4 (the smallest targeted side is 32) and a projection refresh every
    3 steps, so a resume lands between refreshes. Everything else is the shipped fragment.
    """
    method = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())
    init = method["model"]["init_args"]
    adapter = init.get("adapter")
    if adapter is not None:
        args = adapter["init_args"]
        ratio = TINY_ADAPTER["r"] / args["r"]
        for key in ("lora_alpha", "alpha"):
            if args.get(key) is not None:
                args[key] = type(args[key])(args[key] * ratio)
        args.update(TINY_ADAPTER)
    optimizer = init["optimizer"]["init_args"]
    if "rank" in optimizer:
        optimizer.update(rank=4, update_proj_gap=3)
    return write_yaml(folder / f"{name}.yaml", method)


def _check_method_applied(name: str, cli) -> None:
    """The run used the fragment's adapter, optimizer and options (not the base config's)."""
    raw = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())["model"]
    want = raw["init_args"].get("adapter")
    got = cli.model.adapter
    assert (got is None) == (want is None)
    if want is not None:
        assert type(got).__name__ == want["class_path"].rsplit(".", 1)[-1]
        assert got.r == TINY_ADAPTER["r"]
        for key, value in want["init_args"].items():
            if key not in ("r", "lora_alpha", "alpha", "target_modules") and value is not None:
                assert getattr(got, key) == value, key
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == raw["init_args"]["optimizer"]["class_path"].rsplit(".")[-1]
    assert getattr(got, "loraplus_lr_ratio", None) == (
        (want or {}).get("init_args", {}).get("loraplus_lr_ratio"))


COVERED_ELSEWHERE = {"full", "lora", "stella", "manifold_sphere", "garare"}


def test_every_method_has_a_resume_test() -> None:
    assert set(METHODS) - COVERED_ELSEWHERE == {
        "allora", "asymmetric", "dora", "galore", "loraplus", "manifold_stiefel", "pissa",
        "riemannian_lora", "rslora"}


@pytest.mark.parametrize("name", sorted(set(METHODS) - COVERED_ELSEWHERE))
def test_resume_equals_uninterrupted(name: str, tiny_ckpt, glue_dir: Path,
                                     tmp_path: Path) -> None:
    ckpt = tiny_ckpt("bert")
    method = method_fragment(name, tmp_path)
    extra = ("--config", str(method), "--trainer.max_steps", "9")  # crosses the epoch end at 6
    whole_cli = run(tmp_path / "a", ckpt, glue_dir, None, *extra)
    _check_method_applied(name, whole_cli)
    whole = trainable(whole_cli)
    stopped = tmp_path / "b"
    with pytest.raises(Crash):
        run(stopped, ckpt, glue_dir, None, *extra, "--trainer.callbacks+=test_resume.StopAtStep",
            "--trainer.callbacks.step=4")
    last = next((stopped / "runs/lightning_logs").iterdir()) / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed_cli = run(stopped, ckpt, glue_dir, None, *extra, "--ckpt_path", str(last))
    assert resumed_cli.trainer.global_step == whole_cli.trainer.global_step == 9
    got = trainable(resumed_cli)
    assert got.keys() == whole.keys() and whole
    for key in whole:
        torch.testing.assert_close(got[key], whole[key], rtol=0, atol=0, msg=key)
    # Frozen adapter tensors (Asymmetric's A) and callback state continue as well.
    state = dict(resumed_cli.model.model.state_dict())
    for key, value in whole_cli.model.model.state_dict().items():
        if "lora_" in key:
            assert torch.equal(state[key], value), key
    for ours, theirs in zip(resumed_cli.trainer.callbacks, whole_cli.trainer.callbacks):
        if hasattr(ours, "num_steps"):
            assert ours.num_steps == theirs.num_steps == 9
