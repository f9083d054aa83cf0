"""Every bad input stops before training with one clear message, and writes no run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import LORA, glue_run_config, write_yaml

from app.cli import main


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.err + captured.out


def assert_nothing_written(root: Path) -> None:
    written = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert not written, f"a failed start left files behind: {written}"


@pytest.fixture
def config(tiny_ckpt, glue_dir: Path, tmp_path: Path):
    def make(**changes) -> tuple[Path, Path]:
        cfg = glue_run_config(tiny_ckpt("bert"), glue_dir, tmp_path / "runs", adapter=LORA)
        for dotted, value in changes.items():
            node = cfg
            *parents, leaf = dotted.split("__")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return write_yaml(tmp_path / "run.yaml", cfg), tmp_path / "runs"

    return make


def test_misspelled_yaml_key(config, capsys) -> None:
    path, root = config(trainer__max_epoch=3)
    code, out = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2
    assert "max_epoch" in out
    assert_nothing_written(root)


def test_misspelled_adapter_key(config, capsys) -> None:
    path, root = config(model__init_args__adapter={"class_path": "peft.LoraConfig",
                                                   "init_args": {"rank": 8}})
    code, out = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2 and "rank" in out
    assert_nothing_written(root)


def test_unknown_glue_task(config, capsys) -> None:
    path, root = config()
    code, out = run_main(["fit", "--config", str(path), "--data.init_args.task", "rtee"], capsys)
    assert code == 2
    assert "unknown GLUE task 'rtee'" in out and "mnli" in out
    assert_nothing_written(root)


def test_unreachable_hub_checkpoint(config, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, root = config()
    code, out = run_main(["fit", "--config", str(path), "--model.init_args.checkpoint",
                          "some-org/no-such-model"], capsys)
    assert code == 2
    assert "'some-org/no-such-model' is not a local folder" in out
    assert "HF_HUB_OFFLINE is set" in out and "model.init_args.checkpoint: DIR" in out
    assert_nothing_written(root)


def test_missing_local_checkpoint_folder(config, capsys) -> None:
    path, root = config()
    code, out = run_main(["fit", "--config", str(path), "--model.init_args.checkpoint",
                          "./models/missing"], capsys)
    assert code == 2 and "looks like a path but no such folder exists" in out
    assert_nothing_written(root)


def test_target_modules_match_nothing(config, capsys) -> None:
    adapter = {"class_path": "peft.LoraConfig",
               "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    path, root = config(model__init_args__adapter=adapter)
    code, out = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2
    assert "['q_proj', 'v_proj'] match no module" in out
    assert "'query'" in out and "'value'" in out  # names that do exist
    assert_nothing_written(root)


def test_data_dir_missing_file(config, capsys, tmp_path: Path, glue_dir: Path) -> None:
    partial = tmp_path / "glue_partial" / "RTE"
    partial.mkdir(parents=True)
    (partial / "train.tsv").write_text((glue_dir / "RTE/train.tsv").read_text())
    path, root = config(data__init_args__data_dir=str(partial.parent))
    code, out = run_main(["fit", "--config", str(path)], capsys)
    assert code == 2
    assert "has no dev.tsv" in out and str(partial / "dev.tsv") in out
    assert_nothing_written(root)


def test_num_labels_is_linked_from_data(config, capsys) -> None:
    """Changing only the task works: num_labels follows the data (MNLI: 3, two dev splits)."""
    from test_cli_fit import event_tags

    path, root = config()
    main(["fit", "--config", str(path), "--data.init_args.task", "mnli"])
    (run,) = (root / "lightning_logs").iterdir()
    tags = event_tags(run)
    assert {"val/matched/accuracy", "val/mismatched/accuracy", "val/score"} <= tags
    import torch

    state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    (head,) = [v for k, v in state.items() if k.endswith("modules_to_save.default.weight")]
    assert head.shape[0] == 3


@pytest.mark.parametrize("value, ok", [(1e-4, True), (3, True), (0, False), (-1.0, False),
                                       (float("inf"), False), (float("nan"), False),
                                       (True, False), ("1e-4", False), (None, False)])
def test_is_positive_number_is_the_shared_rate_check(value, ok) -> None:
    from app.errors import is_positive_number

    assert is_positive_number(value) is ok
