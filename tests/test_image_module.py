"""The ViT image-classification module end to end through the CLI, on a tiny ViT built from
config and a tiny PACS-layout image tree written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import write_yaml

from app.cli import build_cli
from app.errors import ConfigError
from app.metrics.domains import GroupAccuracy
from app.modules.image_classification import ImageClassificationModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = {"dog": (140, 110, 110), "horse": (110, 110, 140), "house": (110, 140, 110)}
TEST_DOMAINS = ["sketch", "photo"]
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
#: GaLore / GaRare name their target weights in the method fragment (BERT names).
VIT_GALORE_TARGETS = "[q_proj,k_proj,v_proj,o_proj,fc1,fc2]"


def save_tiny_vit(folder: Path, head_labels: int | None = None) -> Path:
    """A 2-layer, hidden-32 ViT for 32 x 32 images, plus its image processor."""
    from transformers import (
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
        ViTModel,
    )

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    if head_labels is None:
        model = ViTModel(config, add_pooling_layer=False)  # a backbone, like the in21k ViTs
    else:
        config.num_labels = head_labels
        model = ViTForImageClassification(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def write_image_tree(root: Path, per_class: int = 8) -> Path:
    """``root/pacs/<domain>/<class>/<i>.png``: class colour plus domain-specific noise."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(DOMAINS):
        for cls, colour in CLASSES.items():
            folder = root / "pacs" / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0, 10 + 30 * d, (32, 32, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("images"))


def run_config(vit: Path, images: Path, root: Path, max_steps: int = 6, **trainer) -> dict:
    """Overrides of ``configs/data/pacs.yaml`` for a short run on the tiny data."""
    return {
        "seed_everything": 7,
        "model": {"init_args": {"checkpoint": str(vit)}},
        "data": {"init_args": {"data_dir": str(images), "test_domains": TEST_DOMAINS,
                               "batch_size": 8, "eval_batch_size": 16}},
        "trainer": {"max_steps": max_steps, "val_check_interval": max_steps,
                    "default_root_dir": str(root), "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1,
                    "accelerator": "cpu", "devices": 1, **trainer},
    }


def fit(tmp: Path, vit: Path, images: Path, method: str, *extra: str, **trainer):
    cfg = write_yaml(tmp / "run.yaml", run_config(vit, images, tmp / "runs", **trainer))
    args = ["fit", "--config", str(CONFIGS / "data" / "pacs.yaml"), "--config", str(cfg),
            "--config", str(CONFIGS / "methods" / f"{method}.yaml")]
    return build_cli([*args, *extra])


def test_lora_trains_head_and_adapter_and_tests_per_domain(
        vit: Path, images: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForImageClassification

    cli = fit(tmp_path, vit, images, "lora", "--model.init_args.optimizer.init_args.lr", "0.01")
    module = cli.model
    assert isinstance(module, ImageClassificationModule)
    assert module.adapter.target_modules == ["q_proj", "v_proj"]  # null filled for ViT
    assert module.class_names == list(CLASSES) and module.num_labels == 3
    assert module.domain_names == list(DOMAINS) and module.test_domains == TEST_DOMAINS
    assert module.model.config.id2label == dict(enumerate(CLASSES))
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    logged = cli.trainer.callback_metrics
    assert {"val/acc", "val/score", "val/acc/art_painting", "val/acc/cartoon"} <= set(logged)
    assert float(logged["val/score"]) == float(logged["val/acc"])

    # The head is trained and the checkpoint holds the adapter and the head only.
    head = module.model.base_model.model.classifier
    assert not torch.equal(head.original_module.weight, head.modules_to_save["default"].weight)
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys), keys[:5]
    assert any(".q_proj.lora_A" in k for k in keys) and any(".v_proj.lora_B" in k for k in keys)
    assert not any(".k_proj." in k for k in keys)
    assert all(v.abs().sum() > 0 for k, v in state["state_dict"].items() if "lora_B" in k)

    # One test dataloader per test domain; the average is the mean of the per-domain values,
    # each of which matches a direct count.
    results = {k: v for r in cli.trainer.test(module, cli.datamodule) for k, v in r.items()}
    assert {f"test/loss/{d}" for d in TEST_DOMAINS} <= set(results)
    per_domain = [results[f"test/acc/{d}"] for d in TEST_DOMAINS]
    assert results["test/acc_avg"] == pytest.approx(sum(per_domain) / 2, abs=1e-6)
    module.eval()
    for domain, loader in zip(TEST_DOMAINS, cli.datamodule.test_dataloader(), strict=True):
        hits = total = 0
        with torch.no_grad():
            for batch in loader:
                hits += int((module(batch).logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
        assert total == 3 * 8 and results[f"test/acc/{domain}"] == pytest.approx(hits / total)

    # The saved adapter (with the image processor) reproduces the module's logits.
    adapter = run / "adapter"
    assert (adapter / "preprocessor_config.json").is_file()
    base = AutoModelForImageClassification.from_pretrained(
        vit, config=AutoConfig.from_pretrained(adapter))
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits,
                                   module.model(pixel_values=pixels).logits)


def test_full_fine_tuning_trains_everything(vit: Path, images: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    cli = fit(tmp_path, vit, images, "full", "--model.init_args.optimizer.init_args.lr", "1e-3",
              max_steps=3)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    model = cli.model.model
    assert all(p.requires_grad for p in model.parameters())
    before = AutoModelForImageClassification.from_pretrained(vit, num_labels=3).state_dict()
    after = model.state_dict()
    name = "vit.layers.0.attention.q_proj.weight"
    assert not torch.equal(before[name], after[name])
    (run,) = (tmp_path / "runs/lightning_logs").iterdir()
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert "model.classifier.weight" in state["state_dict"]
    assert sum("q_proj.weight" in k for k in state["state_dict"]) == 2
    # `test` of the saved run on another, single held-out domain (a scalar for torchmetrics).
    test = build_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path",
                      str(run / "checkpoints/last.ckpt"), "--data.init_args.test_domains",
                      "[photo]", "--trainer.logger", "false"])
    assert test.model.test_domains == ["photo"]
    logged = test.trainer.callback_metrics
    assert float(logged["test/acc/photo"]) == float(logged["test/acc_avg"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fragment_runs_on_vit(method: str, vit: Path, images: Path,
                                           tmp_path: Path) -> None:
    extra = []
    if method in ("galore", "garare"):
        extra = ["--model.init_args.optimizer.init_args.target_modules", VIT_GALORE_TARGETS,
                 "--model.init_args.optimizer.init_args.rank", "4"]
    cli = fit(tmp_path, vit, images, method, *extra, "--trainer.fast_dev_run", "true")
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert "val/score" in cli.trainer.callback_metrics


def test_resume_mid_epoch_equals_uninterrupted(vit: Path, images: Path, tmp_path: Path) -> None:
    """Augmentation and shuffling continue exactly after a resume (5 batches per epoch)."""
    from test_resume import Crash

    def trainable(cli) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in cli.model.model.named_parameters()
                if p.requires_grad}

    every = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.monitor", "null",
             "--checkpoint.filename", "step{step}"]
    whole = trainable(fit(tmp_path / "a", vit, images, "lora", *every, max_steps=8))
    with pytest.raises(Crash):
        fit(tmp_path / "b", vit, images, "lora", *every,
            "--trainer.callbacks+=test_resume.StopAtStep", "--trainer.callbacks.step=3",
            max_steps=8)
    last = next((tmp_path / "b/runs/lightning_logs").iterdir()) / "checkpoints/last.ckpt"
    resumed = trainable(fit(tmp_path / "b", vit, images, "lora", *every, "--ckpt_path", str(last),
                            max_steps=8))
    assert resumed.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)


def test_pretrained_head_of_another_size_is_replaced(tmp_path: Path) -> None:
    from peft import LoraConfig

    ckpt = save_tiny_vit(tmp_path / "vit-1000", head_labels=5)
    module = ImageClassificationModule(checkpoint=str(ckpt), num_labels=3,
                                       class_names=["a", "b", "c"],
                                       adapter=LoraConfig(r=2, target_modules=None))
    module.configure_model()
    head = module.model.base_model.model.classifier.modules_to_save["default"]
    assert head.out_features == 3 and module.model.config.label2id == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ConfigError, match=r"target_modules.*\['query'\].*q_proj"):
        ImageClassificationModule(checkpoint=str(ckpt), num_labels=3,
                                  adapter=LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ConfigError, match="class_names has 2 names"):
        ImageClassificationModule(checkpoint=str(ckpt), num_labels=3, class_names=["a", "b"])


def test_group_accuracy() -> None:
    metric = GroupAccuracy(3)
    preds, target = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 2])
    metric.update(preds, target, torch.tensor([0, 0, 2, 2]))
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
    acc = metric.compute()
    assert acc[0] == 1.0 and acc[1].isnan() and acc[2] == 0.5
    single = GroupAccuracy(1)
    single.update(preds, target, torch.zeros(4, dtype=torch.long))
    assert single.compute().reshape(-1).tolist() == [0.75]
    with pytest.raises(ValueError, match=r"group ids must be in \[0, 3\)"):
        metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([3]))
