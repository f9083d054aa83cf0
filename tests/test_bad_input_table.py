"""One table of bad inputs: each stops before training with exit status 2, ONE ``error:`` line
on stderr that names the option, the bad value and the fix, no traceback and no usage dump,
and leaves no run folder behind (no config.yaml, checkpoint, adapter or event file).
Interruptions (non-finite loss, SIGTERM, Ctrl-C) are in ``test_run_guard.py``; the parse-time
cases of ``test_bad_inputs.py`` are repeated here in short so the table is complete. The
README's bad-input section lists every case.

Every case runs the real ``lightning-cli`` entry point (``app.cli.main``) on the tiny BERT;
``{placeholders}`` in arguments and edits are files written per case (a truncated GLUE dev
file, a SQuAD file with a misplaced answer, a file standing where a folder should be, ...).
"""

from __future__ import annotations

import json
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
METHODS = ROOT / "configs/methods"
TRAINER = "trainer."
STELLA_CB = [{"class_path": "app.callbacks.stella.StellaCallback"}]
M = "model.init_args."


@dataclass
class Case:
    """A bad input: config edits (dotted path -> value), extra CLI args, expected messages."""

    id: str
    edits: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    #: The option (or file option) the error line must name; default: the first expectation.
    option: str | None = None


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
         expect=("model.init_args.adapter.init_args.r=64 exceeds min(in, out)=32",
                 "set r <= 32")),
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
    # -- issue 14: start-up validation (app/validation.py) --------------------------------
    Case("lora-rank-zero", args=(f"--{M}adapter.init_args.r", "0"),
         expect=("model.init_args.adapter.init_args.r=0: a rank must be a positive integer",)),
    Case("lora-rank-negative", args=(f"--{M}adapter.init_args.r", "-4"),
         expect=("model.init_args.adapter.init_args.r=-4",)),
    Case("stella-rank-zero", {M + "adapter": _adapter("app.adapters.stella.StellaConfig", r=0),
                              "trainer.callbacks": STELLA_CB},
         expect=("model.init_args.adapter.init_args.r=0: a rank must be a positive integer",)),
    Case("lora-rank-above-layer", args=(f"--{M}adapter.init_args.r", "1000"),
         expect=("model.init_args.adapter.init_args.r=1000 exceeds min(in, out)=32",
                 "set r <= 32")),
    Case("galore-rank-zero", {M + "adapter": None, M + "optimizer": _galore(rank=0)},
         expect=("model.init_args.optimizer.init_args.rank=0: a rank must be a positive",)),
    Case("targets-empty-list", {M + "adapter": _adapter("peft.LoraConfig", target_modules=[])},
         expect=("model.init_args.adapter.init_args.target_modules=[] names no layer",)),
    Case("targets-not-a-linear-layer",
         {M + "adapter": _adapter("peft.LoraConfig", target_modules=["LayerNorm"])},
         expect=("model.init_args.adapter.init_args.target_modules=['LayerNorm'] matches",
                 "which an adapter cannot wrap")),
    Case("fsdp-string-on-cpu", args=("--trainer.strategy", "fsdp"),
         expect=("trainer.strategy=fsdp needs GPUs", "use trainer.strategy=ddp")),
    Case("strategy-typo", args=("--trainer.strategy", "ddpp"),
         expect=("trainer.strategy=ddpp is not a strategy Lightning knows", "did you mean ddp")),
    Case("fp16-mixed-with-stella-on-cpu",
         {M + "adapter": STELLA, "trainer.callbacks": STELLA_CB},
         args=("--trainer.precision", "16-mixed"),  # the method's declared precisions
         expect=("needs fp32 master weights", "trainer.precision='16-mixed'",
                 "use trainer.precision=bf16-mixed"), option="trainer.precision"),
    Case("fp16-alias-on-cpu", args=("--trainer.precision", "16"),
         expect=("trainer.precision=16: fp16 mixed precision needs a CUDA GPU",)),
    Case("root-dir-not-writable", args=("--trainer.default_root_dir", "/proc/geolora-runs"),
         expect=("trainer.default_root_dir=/proc/geolora-runs is not writable",)),
    Case("root-dir-under-a-file", args=("--trainer.default_root_dir", "{afile}/runs"),
         expect=("is a file, not a folder", "set trainer.default_root_dir to a folder"),
         option="trainer.default_root_dir"),
    Case("two-method-fragments-lora-then-stella",
         args=("--config", str(METHODS / "lora.yaml"), "--config", str(METHODS / "stella.yaml")),
         expect=("a second method fragment after --config", "lora.yaml", "give one method"),
         option="--config"),
    Case("two-method-fragments-stella-then-lora",
         args=("--config", str(METHODS / "stella.yaml"), "--config", str(METHODS / "lora.yaml")),
         expect=("a second method fragment after --config", "stella.yaml"), option="--config"),
    Case("config-path-typo", args=("--config", str(METHODS / "stela.yaml")),
         expect=("stela.yaml: no such file", "did you mean", "stella.yaml"), option="--config"),
    Case("config-path-typo-equals-form", args=(f"--config={ROOT}/configs/method/lora.yaml",),
         expect=("no such file", "configs/method does not exist"), option="--config"),
    Case("ckpt-path-missing", args=("--ckpt_path", "{tmp}/no-such.ckpt"),
         expect=("no-such.ckpt: no such file",), option="--ckpt_path"),
    Case("abbreviated-trainer-key", args=("--trainer.max_step", "20"),
         expect=("unrecognized arguments: --trainer.max_step", "did you mean "
                 "--trainer.max_steps"), option="--trainer.max_step"),
    Case("abbreviated-trainer-key-equals-form", args=("--trainer.max_epoch=2",),
         expect=("--trainer.max_epoch", "did you mean --trainer.max_epochs"),
         option="--trainer.max_epoch"),
    Case("misspelled-data-key", args=("--data.init_args.batchsize", "8"),
         expect=("--data.init_args.batchsize", "has no option 'batchsize'",
                 "did you mean batch_size"),
         option="--data.init_args.batchsize"),
    Case("max-length-too-small", args=("--data.init_args.max_length", "4"),
         expect=("data.init_args.max_length=4 is too small",)),
    Case("batch-size-zero", args=("--data.init_args.batch_size", "0"),
         expect=("data.init_args.batch_size=0 must be at least 1",)),
    Case("max-train-samples-zero", args=("--data.init_args.max_train_samples", "0"),
         expect=("data.init_args.max_train_samples=0 must be at least 1",)),
    Case("learning-rate-negative", args=(f"--{M}optimizer.init_args.lr", "-0.001"),
         expect=("model.init_args.optimizer.init_args.lr=-0.001 must be a finite number > 0",)),
    Case("learning-rate-infinite", args=(f"--{M}optimizer.init_args.lr", ".inf"),
         expect=("model.init_args.optimizer.init_args.lr=inf must be a finite number > 0",)),
    Case("head-learning-rate-zero", args=(f"--{M}head_lr", "0"),
         expect=("model.init_args.head_lr=0", "give a learning rate > 0")),
    Case("accumulate-zero", args=("--trainer.accumulate_grad_batches", "0"),
         expect=("trainer.accumulate_grad_batches=0 must be at least 1",)),
    Case("max-steps-negative", args=("--trainer.max_steps", "-5"),
         expect=("trainer.max_steps=-5 must be -1",)),
    Case("glue-dev-truncated-row", args=("--data.init_args.data_dir", "{truncated}"),
         expect=("dev.tsv has 1 malformed row(s)", "set data.init_args.skip_malformed_rows"),
         option="skip_malformed_rows"),
    Case("squad-answer-start-misplaced", args=("--config", "{squad}"),
         expect=("answer_start=3 does not point at its answer 'dog00'",
                 "set data.init_args.skip_malformed_rows: true"), option="answer_start"),
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
    truncated = tmp_path / "glue_truncated" / "RTE"
    truncated.mkdir(parents=True)
    (truncated / "train.tsv").write_text((glue_dir / "RTE/train.tsv").read_text())
    dev = (glue_dir / "RTE/dev.tsv").read_text().splitlines()
    dev[5] = dev[5].rsplit("\t", 2)[0]  # a row cut short: no label column
    (truncated / "dev.tsv").write_text("\n".join(dev) + "\n")
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    return {"{partial}": str(partial.parent), "{bogus}": str(bogus),
            "{truncated}": str(truncated.parent), "{afile}": str(afile),
            "{tmp}": str(tmp_path), "{squad}": str(_squad_config(tmp_path))}


def _squad_config(tmp_path: Path) -> Path:
    """Data and model for SQuAD v1.1 from a file whose first answer_start is off by one."""
    from test_qa_module import squad_file

    path = squad_file(tmp_path / "squad.json")
    raw = json.loads(path.read_text())
    answer = raw["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]
    answer["answer_start"] = 3  # the text is elsewhere
    path.write_text(json.dumps(raw))
    cfg = {"model": {"class_path": "app.modules.question_answering.QuestionAnsweringModule"},
           "data": {"class_path": "app.data.squad.QADataModule",
                    "init_args": {"task": "squad", "validation_file": str(path),
                                  "train_articles_fraction": 0.5, "max_length": 48,
                                  "doc_stride": 16, "batch_size": 8}},
           "trainer": {"val_check_interval": None, "check_val_every_n_epoch": 1}}
    return write_yaml(tmp_path / "squad.yaml", cfg)


def test_cases_have_unique_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_stops_before_training_with_its_message(case: Case, tiny_ckpt, glue_dir: Path,
                                                          tmp_path: Path, capsys,
                                                          no_distributed_env) -> None:
    root = tmp_path / "runs"
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, root, adapter=LORA)
    for dotted, value in case.edits.items():
        _set(cfg, dotted, value)
    fill = _placeholders(tmp_path, glue_dir)
    args = [_fill(a, fill) for a in case.args]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg)), *args])
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert exc.value.code == 2, out[-2000:]
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err[-2000:]  # one line, ...
    (line,) = errors
    for expected in case.expect:
        assert expected in line, f"{expected!r} not in:\n{line}"
    assert (case.option or case.expect[0].split("=")[0].split(":")[0]) in line  # ... naming it
    assert "Traceback" not in out and "usage:" not in out, out[-2000:]
    left = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert not left, left  # no run folder that looks like a run


def _fill(arg: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        arg = arg.replace(key, value)
    return arg
