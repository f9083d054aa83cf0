"""The precision policy (:mod:`app.precision`) on bf16-saved checkpoints, as hub models are.

For every fragment of ``configs/methods/`` on a bf16-saved tiny Llama under ``bf16-mixed``:
the trainable tensors and the optimizer state are fp32, the frozen base stays bf16 (the
checkpoint's dtype, ``model.init_args.dtype: auto``), the loss is finite, the start-up line
states the dtypes, and the export loads in plain PEFT / transformers and gives the trained
logits. The bf16-saved tiny BERT of every fragment is covered by ``test_bf16.py``. Then the
explicit choices: ``dtype: float32``, ``bf16-true`` (bf16 weights by request) and a refused
half-precision base under ``32-true``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_causal_cli import METHODS, fit_args, method_args, run_cli, run_dir

from app.cli import build_cli
from app.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_causal import write_commonsense

    return write_commonsense(tmp_path_factory.mktemp("cs"), {"boolq": (24, 4)})


def _args(ckpt: Path, cs_dir: Path, root: Path, *extra: str, steps: int = 2) -> list[str]:
    args = fit_args(ckpt, cs_dir, root, *extra, steps=steps, max_length=64)
    return [*[a.replace("[boolq, ARC-Easy]", "[boolq]") for a in args],
            "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
            "--checkpoint.monitor", "null"]


def _fit(ckpt: Path, cs_dir: Path, root: Path, *extra: str, steps: int = 2):
    return build_cli(_args(ckpt, cs_dir, root, *extra, steps=steps))


def _dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], set[torch.dtype]]:
    params = list(model.parameters())
    return ({p.dtype for p in params if p.requires_grad},
            {p.dtype for p in params if not p.requires_grad})


def _state_dtypes(optimizer: torch.optim.Optimizer) -> set[torch.dtype]:
    """The dtypes of the optimizer's moments and projectors (AdamW's ``step`` counter is
    always an fp32 scalar and says nothing about the policy)."""
    return {v.dtype for s in optimizer.state.values() for k, v in s.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step"}


def _exported_logits(run: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    """The export loaded the plain way (PEFT on the base, or the full model), in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run / "adapter"
    if (adapter / "adapter_config.json").is_file():
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("name", METHODS)
def test_bf16_saved_llama_trains_fp32_masters_over_a_bf16_base(
        name: str, tiny_causal, cs_dir: Path, tmp_path: Path, caplog) -> None:
    ckpt = tiny_causal("llama", torch.bfloat16)
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    with caplog.at_level("INFO"):
        cli = _fit(ckpt, cs_dir, tmp_path, *method_args(name), "--config",
                   str(ROOT / "configs/strategy/bf16.yaml"))
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2
    model = cli.model.model
    trainable, frozen = _dtypes(model)
    assert trainable == {torch.float32}
    full = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())[
        "model"]["init_args"].get("adapter") is None
    # the frozen base stays bf16; frozen adapter tensors (Asymmetric LoRA's A) are fp32
    kept = cli.model.trainable_state_keys
    base = {p.dtype for n, p in model.named_parameters()
            if not p.requires_grad and f"model.{n}" not in kept}
    assert base == (set() if full else {torch.bfloat16})
    assert frozen <= {torch.bfloat16, torch.float32}
    assert _state_dtypes(cli.trainer.optimizers[0]) == {torch.float32}
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision ")]
    assert line and "precision bf16-mixed | trainable fp32" in line[0]
    assert ("frozen none" if full else "frozen bf16") in line[0]
    # The trained model in fp32 (its bf16 base upcast exactly) against the export loaded the
    # plain way in fp32: the same function.
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    trained = cli.model.model.float().eval()
    with torch.no_grad():
        want = trained(ids).logits
    got = _exported_logits(run_dir(tmp_path), ckpt, ids)
    # PiSSA trains over the residual W - B0 A0, which a bf16 base stores rounded to bf16
    # (as PEFT does); its export, relative to W itself, cannot carry that full-rank rounding,
    # so it differs by up to the rounding of W's bf16 ulp (measured 6.6e-4 here).
    pissa = str(getattr(cli.model.adapter, "init_lora_weights", "")).startswith("pissa")
    tolerance = 2e-3 if pissa else 1e-4
    torch.testing.assert_close(got, want, atol=tolerance, rtol=1e-4)


def test_dtype_float32_keeps_the_base_fp32_and_bf16_true_trains_bf16(
        tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_causal("llama", torch.bfloat16)
    lora = method_args("lora")
    cli = _fit(ckpt, cs_dir, tmp_path / "f32", *lora, "--config",
               str(ROOT / "configs/strategy/bf16.yaml"), "--model.init_args.dtype", "float32")
    assert _dtypes(cli.model.model) == ({torch.float32}, {torch.float32})
    # 32-true: `auto` loads the bf16 checkpoint as fp32 (no autocast would reconcile them)
    cli = _fit(ckpt, cs_dir, tmp_path / "plain", *lora)
    assert cli.trainer.precision == "32-true"
    assert _dtypes(cli.model.model) == ({torch.float32}, {torch.float32})
    # bf16-true is the explicit way to train bf16 weights, optimizer state included
    cli = _fit(ckpt, cs_dir, tmp_path / "true", *method_args("full"),
               "--trainer.precision", "bf16-true")
    assert _dtypes(cli.model.model) == ({torch.bfloat16}, set())
    assert _state_dtypes(cli.trainer.optimizers[0]) == {torch.bfloat16}


def test_gradient_checkpointing_and_attention_options_reach_the_model(
        tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    cli = _fit(tiny_causal("llama"), cs_dir, tmp_path, *method_args("lora"),
               "--model.init_args.gradient_checkpointing", "true",
               "--model.init_args.attn_implementation", "eager")
    base = cli.model.model.get_base_model()
    assert base.is_gradient_checkpointing and base.config._attn_implementation == "eager"
    assert base.config.use_cache is False


def test_bad_precision_options_are_one_line(tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.init_args.dtype=bfloat16 with "
                                          r"trainer.precision=32-true"):
        _fit(tiny_causal("llama"), cs_dir, tmp_path, "--model.init_args.dtype", "bfloat16")
    result = run_cli(*_args(tiny_causal("llama"), cs_dir, tmp_path / "cli",
                            "--model.init_args.attn_implementation", "no_such_kernel"))
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if "attn_implementation" in ln]
    assert lines and "no_such_kernel" in lines[-1] and "sdpa or eager" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cli" / "lightning_logs").exists()


def _gradients(ckpt: Path, cs_dir: Path, root: Path, name: str, checkpointing: bool
               ) -> dict[str, torch.Tensor]:
    """One forward / backward of the fragment's model on a fixed batch, dropout included
    (seeded): every trainable parameter's gradient."""
    args = _args(ckpt, cs_dir, root, *method_args(name), "--model.init_args.gradient_checkpointing",
                 str(checkpointing).lower())[1:]  # no subcommand: build only
    cli = build_cli([*args, "--trainer.logger", "false"], run=False)
    module = cli.model
    module.configure_model()
    model = module.model
    assert model.training
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.is_gradient_checkpointing == checkpointing
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (3, 24), generator=generator)
    torch.manual_seed(1)  # dropout masks: recomputation must replay the same ones
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(name: str, tiny_causal, cs_dir: Path,
                                                         tmp_path: Path) -> None:
    ckpt = tiny_causal("llama")
    plain = _gradients(ckpt, cs_dir, tmp_path / "plain", name, False)
    recomputed = _gradients(ckpt, cs_dir, tmp_path / "ckpt", name, True)
    assert plain and plain.keys() == recomputed.keys()
    assert any(float(g.abs().max()) > 0 for g in plain.values())
    for key, grad in plain.items():
        torch.testing.assert_close(recomputed[key], grad, atol=1e-6, rtol=1e-5, msg=key)
