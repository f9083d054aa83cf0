"""Strategies: LoRA under two-rank CPU DDP, FSDP's adapter-aware wrapping (policy, a real
two-rank CPU run that matches DDP, export and checkpoint restore), and start-up refusals of
combinations that cannot work sharded.

FSDP runs on CPU here through :class:`CPUAdapterFSDP`, a test-only subclass of the shipped
``AdapterFSDPStrategy`` (gloo; ``configs/strategy/fsdp.yaml`` itself needs GPUs): it wraps with
``device_id=cpu`` and gathers full state dicts without the CPU offload that Lightning always
requests (offloading tensors that are already on the CPU crashes torch 2.13's FSDP1 on gloo).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from ddp_dump import run_cli
from tiny import glue_run_config, tiny_config, write_yaml

from app.cli import build_cli
from app.errors import ConfigError
from app.strategies import AdapterFSDPStrategy, adapter_wrap_policy

ROOT = Path(__file__).resolve().parents[1]
LORA_TINY = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


# -- the shipped fragment -----------------------------------------------------------------------
def test_fsdp_fragment_builds_the_adapter_strategy(tiny_ckpt, glue_dir: Path,
                                                   tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "run.yaml",
                     glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs"))
    cli = build_cli(["--config", str(cfg),
                     "--config", str(ROOT / "configs/strategy/fsdp.yaml"),
                     "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is AdapterFSDPStrategy
    assert strategy.kwargs["use_orig_params"] is True and "auto_wrap_policy" not in strategy.kwargs
    assert strategy._state_dict_type == "full"  # adapter-only checkpoints need the full format
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    raw = yaml.safe_load((ROOT / "configs/strategy/fsdp.yaml").read_text())
    assert raw["trainer"]["accelerator"] == "gpu"


# -- the auto-wrap policy on a real FSDP1 wrap -----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-process gloo group (FSDP needs one), destroyed afterwards."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_model(adapter: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from app.adapters.lora import AsymmetricLoraConfig

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", 120))
    kwargs: dict[str, Any] = {**LORA_TINY, "modules_to_save": ["classifier"]}
    if adapter == "full":
        return model
    if adapter == "asymmetric":
        config = AsymmetricLoraConfig(**kwargs)
        peft_model = get_peft_model(model, config)
        config.initialize(peft_model)
        return peft_model
    return get_peft_model(model, LoraConfig(**kwargs, use_dora=adapter == "dora"))


@pytest.mark.parametrize("adapter", ["lora", "dora", "asymmetric", "full"])
def test_policy_wraps_trainable_leaves_apart_from_frozen_weights(adapter: str,
                                                                 process_group) -> None:
    """``use_orig_params=False`` refuses any FSDP unit that mixes frozen and trainable weights
    ("uniform requires_grad"): the wrap succeeding proves the policy keeps them apart."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _tiny_model(adapter)
    policy = adapter_wrap_policy(model)
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=False,
                   device_id=torch.device("cpu"))
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    for unit in units:  # every flat parameter is all frozen or all trainable
        flags = {p.requires_grad for p in unit.params}
        assert len(flags) <= 1, unit
    names = {n for n, m in wrapped.named_modules() if isinstance(m, FSDP)}
    layers = [n for n in names if n.endswith("encoder.layer.0") or n.endswith("encoder.layer.1")]
    assert len(layers) == 2  # one unit per transformer layer
    lora_units = [n for n in names if n.endswith(("lora_A.default", "lora_B.default"))]
    if adapter == "full":
        assert not lora_units
    else:
        # B (and A where it is trained) are units of their own; Asymmetric's frozen A stays
        # with the frozen layer.
        assert len(lora_units) == (4 if adapter == "asymmetric" else 8), sorted(lora_units)
        out = wrapped(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.tensor([0, 1]))
        out.loss.backward()


def test_without_the_policy_frozen_and_trainable_weights_collide(process_group) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with pytest.raises(ValueError, match="uniform `requires_grad`"):
        FSDP(_tiny_model("lora"), use_orig_params=False, device_id=torch.device("cpu"))


# -- start-up refusals (no processes needed) -------------------------------------------------------
def _strategies() -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return {"FSDPStrategy": FSDPStrategy(), "AdapterFSDPStrategy": AdapterFSDPStrategy(),
            "ModelParallelStrategy": ModelParallelStrategy()}


@pytest.mark.parametrize("name", ["FSDPStrategy", "AdapterFSDPStrategy", "ModelParallelStrategy"])
def test_galore_garare_allora_refuse_sharding(name: str) -> None:
    from app.adapters import resolve_method
    from app.adapters.checks import check_strategy
    from app.adapters.lora import AlloraConfig
    from app.callbacks.allora import AlloraUpdateScaling
    from app.optim.galore import GaLoreAdamW, GaRareAdamW

    def check_optimizer_strategy(factory: Any, strategy: Any) -> None:
        check_strategy(resolve_method(None, factory).spec, strategy)

    strategy = _strategies()[name]
    for cls in (GaLoreAdamW, GaRareAdamW):
        with pytest.raises(ConfigError, match=rf"{cls.__name__} does not support trainer.strategy="
                                              rf"{name}: .*configs/strategy/fsdp2.yaml.*"
                                              rf"trainer.strategy=ddp"):
            check_optimizer_strategy(functools.partial(cls, rank=4), strategy)
    check_optimizer_strategy(functools.partial(torch.optim.AdamW, lr=1e-3), strategy)
    fake = types.SimpleNamespace(strategy=strategy, precision="32-true")
    module = types.SimpleNamespace(adapter=AlloraConfig(r=4, lora_dropout=0.0))
    with pytest.raises(ConfigError, match=rf"AlloraUpdateScaling does not support trainer."
                                          rf"strategy={name}.*configs/strategy/fsdp2.yaml"):
        AlloraUpdateScaling().setup(fake, module, "fit")


def test_fsdp2_strategy_accepts_galore_garare_allora_and_geometry_callbacks() -> None:
    """configs/strategy/fsdp2.yaml's strategy passes the start-up checks that refuse FSDP1,
    GaLore's included (its refresh runs on shards: tests/test_fsdp2.py)."""
    from app.adapters import resolve_method
    from app.adapters.checks import check_strategy, check_trainer
    from app.adapters.lora import AlloraConfig
    from app.adapters.manifold_lora import ManifoldLoraConfig
    from app.adapters.stella import StellaConfig
    from app.callbacks.allora import AlloraUpdateScaling
    from app.fsdp2 import AdapterFSDP2Strategy
    from app.optim.galore import GaLoreAdamW, GaRareAdamW

    def check_optimizer_strategy(factory: Any, strategy: Any) -> None:
        check_strategy(resolve_method(None, factory).spec, strategy)

    strategy = AdapterFSDP2Strategy()
    for cls in (GaLoreAdamW, GaRareAdamW):
        check_optimizer_strategy(functools.partial(cls, rank=4), strategy)
    fake = types.SimpleNamespace(strategy=strategy, precision="32-true")
    for config in (StellaConfig, ManifoldLoraConfig, AlloraConfig):  # each callback's method
        check_trainer(config.spec, fake)
    module = types.SimpleNamespace(adapter=AlloraConfig(r=4, lora_dropout=0.0))
    AlloraUpdateScaling().setup(fake, module, "fit")


def test_module_refuses_model_parallel_and_loraplus_under_fsdp(tiny_ckpt) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from app.modules.classification import ClassificationModule

    ckpt = str(tiny_ckpt("bert"))
    lora = ClassificationModule(checkpoint=ckpt)
    lora.check_strategy(DDPStrategy())
    lora.check_strategy(AdapterFSDPStrategy())
    with pytest.raises(ConfigError, match=r"does not support trainer.strategy=ModelParallelStrategy"
                                          r" .*use FSDP2 through configs/strategy/fsdp2.yaml"):
        lora.check_strategy(_strategies()["ModelParallelStrategy"])
    from app.adapters.loraplus import LoraPlusConfig

    plus = ClassificationModule(checkpoint=ckpt,
                                adapter=LoraPlusConfig(**LORA_TINY, loraplus_lr_ratio=16.0))
    plus.check_strategy(DDPStrategy())
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio \(LoRA\+\) does not support "
                                          r"trainer.strategy=AdapterFSDPStrategy"):
        plus.check_strategy(AdapterFSDPStrategy())


# -- two CPU processes through the real CLI ------------------------------------------------
def _no_offload_context(module: torch.nn.Module, world_size: int, rank0_only: bool = True
                        ) -> Any:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module, StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


@contextlib.contextmanager
def _without_cpu_offload() -> Iterator[None]:
    import lightning.fabric.strategies.model_parallel as fabric_mp
    import lightning.pytorch.strategies.fsdp as pl_fsdp

    saved = pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context
    pl_fsdp._get_full_state_dict_context = _no_offload_context
    fabric_mp._get_full_state_dict_context = _no_offload_context
    try:
        yield
    finally:
        pl_fsdp._get_full_state_dict_context, fabric_mp._get_full_state_dict_context = saved


class CPUAdapterFSDP(AdapterFSDPStrategy):
    """Test-only: :class:`AdapterFSDPStrategy` on CPU processes (see the module docstring)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(module=model, cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                    **self.kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def _two_rank_config(ckpt: Path, glue_dir: Path, root: Path, strategy: Any) -> Path:
    """configs/methods/lora.yaml for the tiny model; 6 steps (2 epochs of 3 per rank)."""
    method = yaml.safe_load((ROOT / "configs/methods/lora.yaml").read_text())
    method["model"]["init_args"]["adapter"]["init_args"].update(LORA_TINY)
    cfg = glue_run_config(ckpt, glue_dir, root / "runs", max_steps=6, val_check_interval=None,
                          limit_val_batches=0)
    cfg["model"]["init_args"].update(method["model"]["init_args"])
    cfg["trainer"].update(strategy=strategy, devices=2, accelerator="cpu")
    cfg["trainer"]["callbacks"] = [{"class_path": "ddp_dump.DumpParams",
                                    "init_args": {"dirpath": str(root / "dump")}}]
    cfg["checkpoint"] = {"every_n_epochs": 1, "save_on_train_epoch_end": True, "monitor": None,
                         "save_top_k": -1, "filename": "step{step}"}
    return write_yaml(root / "run.yaml", cfg)


def _run_two_ranks(config: Path, *extra: str) -> None:
    proc = run_cli("fit", "--config", str(config), *extra, cwd=config.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _exported(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (run,) = (root / "runs/lightning_logs").iterdir()
    return load_file(run / "adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def ddp_lora_run(tiny_ckpt, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_lora")
    _run_two_ranks(_two_rank_config(tiny_ckpt("bert"), glue_dir, root, "ddp"))
    return root


@pytest.mark.slow
def test_lora_ddp_two_ranks_identical(ddp_lora_run: Path) -> None:
    """configs/methods/lora.yaml under two-process CPU DDP: identical parameters on both ranks."""
    ranks = [torch.load(ddp_lora_run / f"dump/rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [6, 6]
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    trainable = ranks[0]["trainable"]
    assert sum("lora_B" in n for n in trainable) == 4
    assert all(p0[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # B trained off zero


def test_ddp_resume_from_an_epoch_end_checkpoint_is_exact(ddp_lora_run: Path, tiny_ckpt,
                                                          glue_dir: Path, tmp_path: Path) -> None:
    """Two ranks resumed from the checkpoint written at the end of epoch 0 (step 3) end with
    the uninterrupted run's parameters on each rank, bit for bit: each rank's dropout state and
    its shard of the epoch order are restored."""
    (saved,) = (ddp_lora_run / "runs/lightning_logs").glob("*/checkpoints/step3*.ckpt")
    config = _two_rank_config(tiny_ckpt("bert"), glue_dir, tmp_path, "ddp")
    _run_two_ranks(config, "--ckpt_path", str(saved))
    for rank in (0, 1):
        whole = torch.load(ddp_lora_run / f"dump/rank{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"dump/rank{rank}.pt", weights_only=True)
        assert resumed["global_step"] == whole["global_step"] == 6
        for name in whole["trainable"]:
            assert torch.equal(resumed["params"][name], whole["params"][name]), (rank, name)


@pytest.mark.slow
def test_fsdp_two_ranks_match_ddp_export_and_restore(ddp_lora_run: Path, tiny_ckpt,
                                                     glue_dir: Path, tmp_path: Path) -> None:
    """The same run under FSDP (LoRA units of their own) ends with DDP's adapter exactly; the
    export gathers both ranks' shards; the adapter-only checkpoint restores into the shards."""
    strategy = {"class_path": "test_strategies.CPUAdapterFSDP"}
    config = _two_rank_config(tiny_ckpt("bert"), glue_dir, tmp_path / "a", strategy)
    _run_two_ranks(config)
    dump = torch.load(tmp_path / "a/dump/rank0.pt", weights_only=True)
    assert dump["world_size"] == 2 and dump["global_step"] == 6
    assert any("lora_A.default._fsdp_wrapped_module.weight" in n for n in dump["params"])
    ours, ddp = _exported(tmp_path / "a"), _exported(ddp_lora_run)
    assert ours.keys() == ddp.keys() and len(ours) == 12  # 8 LoRA factors, pooler, head
    for name in ours:
        assert torch.equal(ours[name], ddp[name]), name

    (run,) = (tmp_path / "a/runs/lightning_logs").iterdir()
    saved = torch.load(run / "checkpoints/step3.ckpt", weights_only=True)
    assert len(saved["state_dict"]) == 12  # adapter, pooler and head, full (gathered) shapes
    assert all(v.ndim in (1, 2) for v in saved["state_dict"].values())
    assert len(saved["rng_states"]["per_rank"]) == 2
    # Resuming at the step-3 checkpoint with max_steps=3 trains nothing: the export at the
    # end of fit is exactly what FSDP loaded into the shards of both ranks.
    restored = _two_rank_config(tiny_ckpt("bert"), glue_dir, tmp_path / "b", strategy)
    _run_two_ranks(restored, "--ckpt_path", str(run / "checkpoints/step3.ckpt"),
                   "--trainer.max_steps", "3")
    back = _exported(tmp_path / "b")
    for key, value in saved["state_dict"].items():
        name = key.removeprefix("model.").replace(".default.", ".").replace(
            "modules_to_save.", "")
        assert torch.equal(back[name], value), name


def test_fsdp_checkpoint_keys_are_checked_before_loading(tiny_ckpt, glue_dir: Path,
                                                         tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP loads weights itself (non-strictly); a checkpoint of another method is refused."""
    from app.cli import main

    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    bogus = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.bert.encoder.layer.0.output.dense.weight": torch.zeros(2)},
                "global_step": 0, "epoch": 0, "pytorch-lightning_version": L.__version__},
               bogus)
    cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs",
                          adapter={"class_path": "peft.LoraConfig", "init_args": LORA_TINY})
    cfg["trainer"]["strategy"] = {"class_path": "test_strategies.CPUAdapterFSDP"}
    try:
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", str(write_yaml(tmp_path / "run.yaml", cfg)),
                  "--ckpt_path", str(bogus)])
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint does not match this model and adapter: 12 missing keys" in err
    assert "1 unexpected" in err and "resume with the same method" in err
