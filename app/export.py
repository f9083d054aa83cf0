"""Export a trained run: a PEFT adapter from any Lightning checkpoint, or a merged Hugging Face
model that needs neither PEFT nor this project.

    python -m app.export adapter --ckpt runs/.../checkpoints/last.ckpt --output my-adapter
    python -m app.export merged --adapter runs/.../adapter --output my-merged-model
    python -m app.export merged --ckpt runs/.../checkpoints/best.ckpt --output my-merged-model

The run's ``config.yaml`` (written by the CLI beside the checkpoints folder) rebuilds the model;
pass ``--config`` when the checkpoint was moved. Outputs appear atomically (written under a
temporary name, then renamed): an interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from app.atomic import atomic_folder
from app.errors import ConfigError


def _run_config(ckpt: Path, config: Path | None) -> Path:
    if config is not None:
        return config
    candidate = ckpt.resolve().parent.parent / "config.yaml"
    if not candidate.is_file():
        raise ConfigError(f"no config.yaml next to {ckpt.parent}; pass --config RUN/config.yaml")
    return candidate


def export_adapter(ckpt: Path, output: Path, config: Path | None = None) -> Path:
    """Rebuild the module from the run config, load ``ckpt`` and save its adapter."""
    from app.cli import build_cli

    if not ckpt.is_file():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    import yaml

    settings = yaml.safe_load(_run_config(ckpt, config).read_text())
    for key in ("ckpt_path", "weights_only"):  # `fit` options; the model is rebuilt, not fit
        settings.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(settings))
        cli = build_cli(["--config", str(path), "--trainer.accelerator", "cpu",
                         "--trainer.devices", "1", "--trainer.strategy", "auto",
                         "--trainer.logger", "false"], run=False)
    module = cli.model
    module.configure_model()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    return module.save_adapter(output)


def export_merged(adapter: Path, output: Path, base: str | None = None) -> Path:
    """Merge a saved adapter into its base model and save a plain Hugging Face model."""
    import transformers
    from peft import PeftModel

    from app.hub import load_pretrained

    if not (adapter / "config.json").is_file():
        raise ConfigError(f"{adapter} has no config.json; is it an adapter folder of a run?")
    config = transformers.AutoConfig.from_pretrained(adapter)
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    with atomic_folder(output) as tmp:
        adapter_config = adapter / "adapter_config.json"
        if adapter_config.is_file():
            source = base or json.loads(adapter_config.read_text())["base_model_name_or_path"]
            model = load_pretrained(model_class, source, config=config)
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        else:  # full fine-tuning: the folder already is a complete model
            model = model_class.from_pretrained(adapter)
        model.save_pretrained(tmp)
        for name in os.listdir(adapter):
            if "token" in name or name in ("vocab.txt", "merges.txt", "preprocessor_config.json"):
                shutil.copy2(adapter / name, tmp / name)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.export", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p_adapter = sub.add_parser("adapter", help="PEFT adapter from a Lightning checkpoint")
    p_adapter.add_argument("--ckpt", type=Path, required=True)
    p_adapter.add_argument("--config", type=Path)
    p_adapter.add_argument("--output", type=Path, required=True)
    p_merged = sub.add_parser("merged", help="merged Hugging Face model")
    p_merged.add_argument("--adapter", type=Path, help="adapter folder of a run")
    p_merged.add_argument("--ckpt", type=Path, help="or a Lightning checkpoint")
    p_merged.add_argument("--config", type=Path)
    p_merged.add_argument("--base", help="base checkpoint (default: from adapter_config.json)")
    p_merged.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.what == "adapter":
            path = export_adapter(args.ckpt, args.output, args.config)
        else:
            if (args.adapter is None) == (args.ckpt is None):
                parser.error("merged: give exactly one of --adapter or --ckpt")
            if args.ckpt is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    adapter = export_adapter(args.ckpt, Path(tmp) / "adapter", args.config)
                    path = export_merged(adapter, args.output, args.base)
            else:
                path = export_merged(args.adapter, args.output, args.base)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported to {path}")


if __name__ == "__main__":
    main()
