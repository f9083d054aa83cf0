"""The shipped method fragments keep the papers' defaults where the comparison relies on them:
StelLA's S out of weight decay and its stated warm-up, Manifold-LoRA's adaptive A rate."""

from __future__ import annotations

from pathlib import Path

from app.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(method: str, ckpt: Path, glue_dir: Path):
    return build_cli(["--config", str(ROOT / "configs/data/glue_mrpc.yaml"),
                      "--config", str(ROOT / f"configs/methods/{method}.yaml"),
                      "--model.init_args.checkpoint", str(ckpt),
                      "--data.init_args.data_dir", str(glue_dir),
                      "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)


def test_stella_keeps_s_u_v_out_of_weight_decay(tiny_ckpt, glue_dir: Path) -> None:
    import torch

    cli = _cli("stella", tiny_ckpt("bert"), glue_dir)
    module = cli.model
    module.configure_model()
    groups = module.parameter_groups()
    decayed = {n for g in groups if g.get("weight_decay", 0.01) > 0 for n, _ in g["params"]}
    factors = {n for n, _ in module.model.named_parameters() if "stella_" in n}
    assert any("stella_S" in n for n in factors) and not factors & decayed
    assert any(n.endswith("classifier.weight") for n in decayed)  # the head still decays
    scheduler = module.scheduler_factory(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
    assert (type(scheduler).__name__, scheduler.warmup, scheduler.decay) == (
        "WarmupDecay", 0.06, "linear")


def test_manifold_lora_adapts_a_rate_as_in_the_paper(tiny_ckpt, glue_dir: Path) -> None:
    for method in ("manifold_stiefel", "manifold_sphere"):
        cli = _cli(method, tiny_ckpt("bert"), glue_dir)
        landing = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LandingCallback"]
        assert len(landing) == 1 and landing[0].balance_a_lr is True, method
        assert abs(landing[0].mu - 1 / 3) < 1e-12
