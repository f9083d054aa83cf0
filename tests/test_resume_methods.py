"""Every method's real YAML fragment, sized for the tiny test model.

The resume tests of every fragment (a real ``lightning-cli fit`` stopped by SIGTERM
mid-epoch, resumed from its ``last.ckpt`` and from a checkpoint written after validation,
also under two-process DDP) are in ``test_resume_sigterm.py``; they replace the in-process
crash-at-step-4 runs this file held, which never built the loader the way a data fragment's
``max_epochs`` does and so missed the lost loader position.
"""

from __future__ import annotations

from pathlib import Path

import yaml
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
