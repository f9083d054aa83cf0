"""The causal-LM module end to end through the installed ``lightning-cli``: every method
fragment of ``configs/methods/`` unchanged on a tiny Llama (one subprocess each), other
architectures, test-time scoring, exact resume, and the export loaded by plain PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import subprocess_env
from tiny_causal import write_commonsense

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "lightning-cli"
METHODS = sorted(p.stem for p in (ROOT / "configs/methods").glob("*.yaml"))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "app"]
    env = subprocess_env(PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def cs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("cs"),
                             {"boolq": (24, 4), "ARC-Easy": (24, 4)})


def fit_args(ckpt: Path, cs_dir: Path, root: Path, *extra: str, steps: int = 2,
             max_length: int = 96) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/data/commonsense.yaml"), *extra,
            "--model.init_args.checkpoint", str(ckpt),
            "--data.init_args.data_dir", str(cs_dir),
            "--data.init_args.test_tasks", "[boolq, ARC-Easy]",
            "--data.init_args.val_size", "4", "--data.init_args.batch_size", "4",
            "--data.init_args.max_length", str(max_length), "--seed_everything", "3",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.default_root_dir", str(root)]


def run_dir(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"))[-1]


def event_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def trained_model(folder: Path) -> torch.nn.Module:
    """The run's module rebuilt from its config with ``last.ckpt`` loaded (what fit ended
    with)."""
    from app.cli import build_cli

    settings = yaml.safe_load((folder / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # fit options; the model is rebuilt, not fit
        settings.pop(key, None)
    path = folder / "rebuild.yaml"
    path.write_text(yaml.safe_dump(settings))
    cli = build_cli(["--config", str(path), "--trainer.logger", "false"], run=False)
    module = cli.model
    module.configure_model()
    state = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    return module.model.eval()


def exported_model(folder: Path, base: Path) -> torch.nn.Module:
    """The exported folder loaded the plain way: PEFT on the base, or a full model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = folder / "adapter"
    if (adapter / "adapter_config.json").is_file():
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                         adapter).eval()
    return AutoModelForCausalLM.from_pretrained(adapter).eval()


def method_args(name: str) -> list[str]:
    """The shipped fragment, plus the only size change the 16-wide k/v projections need."""
    args = ["--config", str(ROOT / f"configs/methods/{name}.yaml")]
    raw = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())
    if "rank" in raw["model"]["init_args"]["optimizer"]["init_args"]:
        args += ["--model.init_args.optimizer.init_args.rank", "4"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_every_method_fits_on_a_tiny_llama(name: str, tiny_causal, cs_dir: Path,
                                           tmp_path: Path) -> None:
    ckpt = tiny_causal("llama")
    result = run_cli(*fit_args(ckpt, cs_dir, tmp_path, *method_args(name)))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir(tmp_path)
    tags = event_tags(folder)
    assert {"train/loss", "val/loss", "val/acc_avg", "val/acc/boolq", "val/score"} <= tags
    state = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    raw = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())
    full = raw["model"]["init_args"].get("adapter") is None
    base_keys = [k for k in state if k.endswith("q_proj.weight") or k.endswith("base_layer.weight")]
    if full:
        assert base_keys, "full training checkpoints hold the weights"
    else:
        assert not base_keys, "adapter-only checkpoints: no frozen base weights"
        # the Llama default targets, not PEFT's q/v default
        for target in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"):
            assert any(f".{target}." in k for k in state), (target, sorted(state)[:6])
        assert not any(".o_proj." in k or ".gate_proj." in k for k in state)
        assert not any("lm_head" in k for k in state)
    # the export reproduces the trained model's logits through plain PEFT / transformers
    trained, exported = trained_model(folder), exported_model(folder, ckpt)
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lora_on_qwen2_and_gpt2(arch: str, tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_causal(arch)
    # transformers 5 rebuilds the saved word-level tokenizer as its Qwen2 / GPT-2 byte-level
    # class (no merges: one token per character), so the prompts are longer here.
    result = run_cli(*fit_args(ckpt, cs_dir, tmp_path, *method_args("lora"), max_length=480))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir(tmp_path)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    want = {"qwen2": {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"},
            "gpt2": {"c_attn"}}[arch]  # GPT-2: PEFT's default for the architecture
    assert set(config["target_modules"]) == want
    trained, exported = trained_model(folder), exported_model(folder, ckpt)
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.slow
def test_resume_is_exact(tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_causal("llama")
    lora = [*method_args("lora"), "--model.init_args.adapter.init_args.lora_dropout", "0.0",
            "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.monitor", "null", "--checkpoint.filename", "step{step}"]
    straight = run_cli(*fit_args(ckpt, cs_dir, tmp_path / "a", *lora, steps=4))
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_cli(*fit_args(ckpt, cs_dir, tmp_path / "b", *lora, steps=4),
                      "--trainer.callbacks+=test_resume.StopAtStep",
                      "--trainer.callbacks.step=2")
    assert crashed.returncode != 0 and "simulated crash at step 2" in crashed.stderr
    part = run_dir(tmp_path / "b")
    resumed = run_cli(*fit_args(ckpt, cs_dir, tmp_path / "b", *lora, steps=4),
                      "--ckpt_path", str(part / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def weights(root: Path) -> dict[str, torch.Tensor]:
        state = torch.load(run_dir(root) / "checkpoints" / "last.ckpt", map_location="cpu",
                           weights_only=False)
        assert state["global_step"] == 4
        return state["state_dict"]

    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_test_scoring_given_on_the_command_line_is_honoured(tiny_causal, cs_dir: Path,
                                                            tmp_path: Path) -> None:
    ckpt = tiny_causal("llama")
    fitted = run_cli(*fit_args(ckpt, cs_dir, tmp_path / "a", *method_args("lora")))
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    folder = run_dir(tmp_path / "a")
    tested = run_cli("test", "--config", str(folder / "config.yaml"),
                     "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"),
                     "--model.init_args.scoring", "generate",
                     "--model.init_args.max_new_tokens", "4",
                     "--trainer.default_root_dir", str(tmp_path / "t"))
    assert tested.returncode == 0, tested.stderr[-3000:]
    predictions = [json.loads(line) for line in
                   (run_dir(tmp_path / "t") / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and {p["task"] for p in predictions} == {"boolq", "ARC-Easy"}
    assert all("output" in p for p in predictions)  # generated, not log-likelihood scored
    assert {"test/acc/boolq", "test/acc/ARC-Easy", "test/acc_avg"} <= event_tags(
        run_dir(tmp_path / "t"))


def test_bad_targets_and_gguf_errors_are_one_line(tiny_causal, cs_dir: Path,
                                                  tmp_path: Path) -> None:
    ckpt = tiny_causal("llama")
    bad = run_cli(*fit_args(ckpt, cs_dir, tmp_path, *method_args("lora")),
                  "--model.init_args.adapter.init_args.target_modules", "[query, value]")
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "['query', 'value'] match no module" in line
    assert "q_proj" in line and "down_proj" in line  # lists the layers it has
    fake = tmp_path / "model.Q4_0.gguf"
    fake.write_bytes(b"GGUF")
    unreadable = run_cli(*fit_args(fake, cs_dir, tmp_path / "g", *method_args("lora")))
    assert unreadable.returncode == 2
    line = unreadable.stderr.strip().splitlines()[-1]
    # with the gguf package: the file is not GGUF; without it: what to install
    assert line.startswith("error:") and ("could not be read as a GGUF model" in line
                                          or "pip install gguf" in line)


@pytest.mark.slow
def test_ddp_two_ranks_train_alike_and_test_scores_every_question_once(
        tiny_causal, cs_dir: Path, tmp_path: Path) -> None:
    """StelLA (a geometry callback on every step) on the causal module under two-process CPU
    DDP: both ranks end with identical parameters after the same steps, the validation
    accuracy is logged from the gathered questions, and ``test`` on two ranks scores every
    question exactly once, with the same predictions and accuracy as on one process."""
    ckpt = tiny_causal("llama")
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    fitted = run_cli(*fit_args(ckpt, cs_dir, tmp_path / "fit", *method_args("stella"),
                               steps=3), *ddp,
                     "--trainer.callbacks+=ddp_dump.DumpParams",
                     f"--trainer.callbacks.dirpath={tmp_path / 'dump'}")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert any("stella_U" in n for n in ranks[0]["trainable"])
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    folder = run_dir(tmp_path / "fit")
    assert {"val/acc_avg", "val/acc/boolq", "train/loss"} <= event_tags(folder)

    def tested(root: Path, *extra: str) -> tuple[list[dict], set[str]]:
        result = run_cli("test", "--config", str(folder / "config.yaml"),
                         "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"),
                         "--trainer.default_root_dir", str(root), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        out = run_dir(root)
        lines = (out / "predictions_test.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines], event_tags(out)

    one, _ = tested(tmp_path / "t1", "--trainer.strategy", "auto", "--trainer.devices", "1")
    two, tags = tested(tmp_path / "t2", *ddp)
    keys = [(p["task"], p["index"]) for p in two]
    assert len(keys) == len(set(keys)) == 8  # 4 questions x 2 tasks, none repeated or lost
    assert [(p["task"], p["index"], p["prediction"]) for p in two] == \
        [(p["task"], p["index"], p["prediction"]) for p in one]
    for a, b in zip(one, two):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=2e-4)
    assert {"test/acc_avg", "test/acc/boolq", "test/acc/ARC-Easy"} <= tags
