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


def _groups_by_param(optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def test_head_lr_sets_the_head_rate_for_every_fragment(tiny_ckpt, glue_dir: Path) -> None:
    """``model.init_args.head_lr`` puts exactly the pooler and classifier parameters at that
    rate for every fragment (LoRA+ and the GaLore / GaRare optimizers included), keeps their
    weight decay (none on biases), leaves every other parameter where the fragment puts it,
    and the schedule scales the head's rate like the others."""
    head_lr = 3.0e-5
    for path in METHODS:
        plain = _module(path, tiny_ckpt("bert"), glue_dir)
        cli = build_cli(["--config", str(Path(__file__).resolve().parents[1] / "configs"
                                         / "data" / "glue_mrpc.yaml"), "--config", str(path),
                         "--model.init_args.checkpoint", str(tiny_ckpt("bert")),
                         "--model.init_args.head_lr", str(head_lr),
                         "--data.init_args.data_dir", str(glue_dir),
                         "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
        module = cli.model
        module.configure_model()
        built = {}
        for name, m in (("plain", plain), ("head", module)):
            built[name] = m.method.build_optimizer(m.model, m.optimizer_factory,
                                                   m.parameter_groups())
        names = dict(plain.model.named_parameters())
        named = dict(module.model.named_parameters())
        trainable = [n for n, p in named.items() if p.requires_grad]
        head_names = [n for n in trainable if ".pooler." in n or "classifier." in n]
        assert head_names, path.stem
        before, after = _groups_by_param(built["plain"]), _groups_by_param(built["head"])
        assert len(after) == len(trainable), path.stem  # every trainable parameter, once
        for n in trainable:
            group, old = after[id(named[n])], before[id(names[n])]
            if n in head_names:
                assert group["lr"] == head_lr, (path.stem, n)
                assert group["weight_decay"] == old["weight_decay"], (path.stem, n)
                assert old["lr"] != head_lr
            else:
                assert group["lr"] == old["lr"] and group["lr"] != head_lr, (path.stem, n)
                assert group["weight_decay"] == old["weight_decay"], (path.stem, n)
        # The schedule multiplies every group's rate by the same factor.
        optimizer = built["head"]
        scheduler = module.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(20)
        start = [g["lr"] for g in optimizer.param_groups]
        for _ in range(5):
            optimizer.step()
            scheduler.step()
        factors = {round(g["lr"] / s, 12) for g, s in zip(optimizer.param_groups, start)}
        assert len(factors) == 1 and 0 < factors.pop() != 1, path.stem
