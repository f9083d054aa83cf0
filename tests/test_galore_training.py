"""GaLore / GaRare wired into training: the YAML fragments through the CLI, resume, two-rank
DDP, and start-up errors for combinations that cannot work."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from ddp_dump import run_two_ranks
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import LORA, glue_run_config, write_yaml

from app.cli import AppCLI, main
from app.data.glue import GLUEDataModule
from app.errors import ConfigError
from app.modules.classification import ClassificationModule
from app.optim.compat import check_optimizer_adapter, optimizer_class
from app.optim.galore import GaLoreAdamW, GaRareAdamW

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query", "key", "value", "dense"]


def _method(name: str, **init_args) -> dict:
    """configs/methods/<name>.yaml with optimizer init_args overridden for the tiny model."""
    method = yaml.safe_load((ROOT / f"configs/methods/{name}.yaml").read_text())
    method["model"]["init_args"]["optimizer"]["init_args"].update(init_args)
    return method


def _config(ckpt: Path, glue_dir: Path, root: Path, method: dict, max_steps: int) -> dict:
    cfg = glue_run_config(ckpt, glue_dir, root, max_steps=max_steps)
    cfg["model"]["init_args"].update(method["model"]["init_args"])
    cfg["trainer"]["callbacks"] = method["trainer"]["callbacks"]
    return cfg


def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.parametrize("name", ["galore", "garare"])
def test_yaml_fragment_trains_and_reduces_loss(name: str, tiny_ckpt, glue_dir, tmp_path) -> None:
    method = _method(name, rank=4, lr=5e-3, update_proj_gap=10)
    cfg = _config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", method, max_steps=42)
    cfg["trainer"].update(val_check_interval=1.0, check_val_every_n_epoch=7)
    cfg["model"]["init_args"]["scheduler"] = {  # constant lr: 42 tiny steps are few
        "class_path": "torch.optim.lr_scheduler.ConstantLR", "init_args": {"factor": 1.0}}
    main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg))])
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    loss = _scalars(run, "train/loss")
    assert len(loss) == 42
    first, last = sum(loss[:6]) / 6, sum(loss[-6:]) / 6  # first and seventh epoch
    assert last < 0.5 * first, (first, last)
    # the optimizer really projected: moments of query are rank x 32, not 32 x 32
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    index = group["param_names"].index("bert.encoder.layer.0.attention.self.query.weight")
    state = ckpt["optimizer_states"][0]["state"][group["params"][index]]
    assert tuple(state["exp_avg"].shape) == (32, 4)
    assert ("projector" in state) == (name == "galore")
    assert _scalars(run, "memory/optimizer_state_bytes")  # the fragment's MemoryMonitor


class _ReseedEachStep(L.Callback):
    """Global RNG = f(step) before each batch: dropout does not depend on whether the process
    was restarted (Lightning does not checkpoint the global RNG)."""

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        torch.manual_seed(100 + trainer.global_step)


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit_garare(ckpt: Path, glue_dir: Path, root: Path, callbacks: list, steps: int,
                ckpt_path: str | None = None) -> ClassificationModule:
    L.seed_everything(7)
    optimizer = partial(GaRareAdamW, lr=3e-3, weight_decay=0.01, target_modules=TARGETS, rank=4,
                        update_proj_gap=4, scale=2.0, seed=11)
    module = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2,
                                  optimizer=optimizer)
    data = GLUEDataModule(task="rte", data_dir=str(glue_dir), checkpoint=str(ckpt),
                          max_length=32, batch_size=8)
    trainer = L.Trainer(max_steps=12, callbacks=[_ReseedEachStep(), *callbacks],
                        default_root_dir=root, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return module


def test_garare_resume_equals_uninterrupted(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """6 steps, checkpoint, resume to 12 == 12 steps (P blocks of 4 straddle the restart)."""
    ckpt = tiny_ckpt("bert")
    full = _fit_garare(ckpt, glue_dir, tmp_path / "full", [], 12)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_last=True)
    _fit_garare(ckpt, glue_dir, tmp_path / "part", [saver, _StopAt(6)], 6)
    resumed = _fit_garare(ckpt, glue_dir, tmp_path / "resumed", [], 12,
                          ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    start = ClassificationModule(checkpoint=str(ckpt), task="rte", num_labels=2)
    start.configure_model()
    initial = dict(start.model.named_parameters())
    ours = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():
        assert torch.equal(param, ours[name]), name
        if "classifier" not in name:
            moved = not torch.equal(param, initial[name])
            assert moved or "token_type" in name or "position" in name, name


@pytest.mark.slow
def test_garare_ddp_two_ranks_identical(tiny_ckpt, glue_dir: Path, tmp_path: Path) -> None:
    """Two CPU processes through the real CLI with configs/methods/garare.yaml."""
    method = _method("garare", rank=4, lr=3e-3, update_proj_gap=2, seed=5)
    cfg = _config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", method, max_steps=3)
    rank0, _, proc = run_two_ranks(cfg, tmp_path, steps=3)  # identical on both ranks
    assert "memory: trainable" in proc.stdout + proc.stderr
    assert len(rank0["trainable"]) == len(rank0["params"])  # full fine-tuning


# -- start-up errors ------------------------------------------------------------------------
def _cli_error(cfg: dict, tmp_path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg))])
    assert exc.value.code == 2
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # nothing trained
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["galore", "garare"])
def test_refuses_adapter(name: str, tiny_ckpt, glue_dir, tmp_path, capsys) -> None:
    cfg = _config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", _method(name, rank=4), 6)
    cfg["model"]["init_args"]["adapter"] = LORA
    err = _cli_error(cfg, tmp_path, capsys)
    assert ("error: model.init_args.optimizer: " in err and "with adapter LoraConfig" in err
            and "GaLore/GaRare optimise full weights; set model.init_args.adapter: null" in err)


@pytest.mark.parametrize("init_args, match", [
    ({"target_modules": ["attention_typo"]}, r"target_modules=\['attention_typo'\] matched no "
                                             r"2-D parameter.*attention.self.query.weight"),
    ({"rank": 64}, r"rank=64 exceeds min\(p, q\)=32 of targeted weight 'bert\.encoder\.layer\.0"),
    ({"target_modules": None}, r"rank=4 exceeds min\(p, q\)=2 of targeted weight "
                               r"'classifier.weight'"),
])
def test_refuses_bad_targets_or_rank(init_args: dict, match: str, tiny_ckpt, glue_dir, tmp_path,
                                     capsys) -> None:
    method = _method("garare", **{"rank": 4, **init_args})
    cfg = _config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", method, 6)
    err = _cli_error(cfg, tmp_path, capsys)
    assert "error: model.init_args.optimizer.init_args (GaRareAdamW on " in err
    assert pytest.importorskip("re").search(match, err), err


def test_optimizer_class_from_a_real_cli_parse(tiny_ckpt, glue_dir, tmp_path) -> None:
    cfg = _config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", _method("garare", rank=4), 6)
    cli = AppCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                 subclass_mode_data=True, run=False,
                 args=["--config", str(write_yaml(tmp_path / "run.yaml", cfg))])
    factory = cli.model.optimizer_factory
    assert optimizer_class(factory) is GaRareAdamW
    assert optimizer_class(torch.optim.AdamW) is torch.optim.AdamW
    assert optimizer_class(partial(GaLoreAdamW, rank=2)) is GaLoreAdamW
    assert optimizer_class(lambda params: torch.optim.SGD(params, lr=1)) is None
    with pytest.raises(ConfigError, match="set model.init_args.adapter: null"):
        check_optimizer_adapter(factory, object())
    check_optimizer_adapter(partial(torch.optim.AdamW, lr=1e-3), object())  # not GaLore: ok


def test_sharded_parameters_message_says_what_to_use(tmp_path) -> None:
    """A DTensor weight sharded across its short side (not FSDP2's long-side layout) is
    refused, naming the fragment that shards it right (a real DTensor on a one-process
    gloo mesh: app.dtensor.is_dtensor checks the type, not its name)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # a tall weight split by columns
        weight = torch.nn.Parameter(distribute_tensor(torch.zeros(16, 8), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match=r"sharded as .*Shard\(dim=1\).*long dimension "
                                             r".*configs/strategy/fsdp2.yaml"):
            GaRareAdamW([("layer.query.weight", weight)], target_modules=["query"], rank=2)
    finally:
        if started:
            dist.destroy_process_group()
