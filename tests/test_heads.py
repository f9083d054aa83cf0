"""The task head is trained as in the papers: BERT's pooler (the dense layer the classifier
reads), RoBERTa's classification head (dense + out_proj) and DeBERTa-v2's pooler, for every
adapter method fragment in ``configs/methods/`` (built through the real CLI parser)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.adapters import head_module_names
from app.cli import build_cli

METHODS = sorted((Path(__file__).resolve().parents[1] / "configs" / "methods").glob("*.yaml"))
ADAPTER_METHODS = [p for p in METHODS
                   if (yaml.safe_load(p.read_text())["model"]["init_args"].get("adapter"))]


def _module(path: Path, ckpt: Path, glue_dir: Path):
    cli = build_cli(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "data"
                                    / "glue_mrpc.yaml"), "--config", str(path),
                     "--model.init_args.checkpoint", str(ckpt),
                     "--data.init_args.data_dir", str(glue_dir),
                     "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
    module = cli.model
    module.configure_model()
    return module


def _trainable(module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_head_names_per_architecture(tiny_ckpt) -> None:
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    names = {arch: head_module_names(AutoModelForSequenceClassification.from_pretrained(
        tiny_ckpt(arch), num_labels=2)) for arch in ("bert", "roberta", "deberta")}
    assert names == {"bert": ["bert.pooler", "classifier"], "roberta": ["classifier"],
                     "deberta": ["pooler", "classifier"]}
    qa = AutoModelForQuestionAnswering.from_pretrained(tiny_ckpt("bert"))
    assert head_module_names(qa) == ["qa_outputs"]  # no pooler in a QA backbone


def test_every_adapter_fragment_trains_the_pooler(tiny_ckpt, glue_dir: Path) -> None:
    assert len(ADAPTER_METHODS) >= 8  # the LoRA family, StelLA, Manifold-LoRA, ...
    for path in ADAPTER_METHODS:
        module = _module(path, tiny_ckpt("bert"), glue_dir)
        trainable = _trainable(module)
        pooler = [n for n in trainable if ".pooler." in n and n.endswith("dense.weight")]
        classifier = [n for n in trainable if "classifier" in n and n.endswith("weight")]
        assert pooler and classifier, (path.stem, sorted(trainable)[:8])
        # Exactly what a checkpoint keeps, and counted as trainable parameters.
        assert any(".pooler." in k for k in module.trainable_state_keys), path.stem
        base = [n for n in trainable if "encoder.layer" in n and "attention" in n
                and not any(m in n for m in ("lora_", "stella_"))]
        assert not base, (path.stem, base[:3])  # the backbone itself stays frozen


@pytest.mark.parametrize("arch,dense", [("roberta", "classifier"), ("deberta", "pooler")])
def test_roberta_and_deberta_dense_head_is_trained(tiny_ckpt, glue_dir: Path, arch: str,
                                                   dense: str) -> None:
    for stem in ("lora", "stella"):
        path = next(p for p in ADAPTER_METHODS if p.stem == stem)
        trainable = _trainable(_module(path, tiny_ckpt(arch), glue_dir))
        assert any(f"{dense}." in n and "dense.weight" in n for n in trainable), (arch, stem)
